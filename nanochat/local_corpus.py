"""The offline corpus: documents gathered from text already on this machine, split into shards.

Documents are the pydoc topics, the docstrings and sources of the standard library, and the
readable docs under /usr/share (READMEs, copyright files, licenses, English man pages, rendered
from roff to plain text here). Candidate files are listed in sorted order, shuffled with a fixed
seed and read until `target_mb` of text is gathered; no "group" (a stdlib package, a Debian
package's docs, the man pages of one command family such as gcloud-*) may take more than
GROUP_SHARE of the total. Two builds on the same machine give the same documents in the same
shards; the content differs between machines.

    shards, info = local_shards(target_mb=40, val_fraction=0.05, shard_mb=8)  # list[list[str]]

This module only chooses text; nanochat.dataset writes it as parquet shards (build_local_corpus).
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import os
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

LOCAL_SEED = 1234
DOC_CHARS = 16_000  # long files are cut into documents of at most this many chars, at paragraphs
MIN_DOC_CHARS = 100  # shorter documents (`.so` man redirects, stubs) are dropped
MIN_VAL_DOCS = 128  # the val shard gets at least this many documents, whatever target_mb
GROUP_SHARE = 0.05  # one group takes at most this share of the target ...
MIN_GROUP_CHARS = 1_000_000  # ... or this many chars, whichever is larger
DOC_ROOT = Path("/usr/share/doc")
MAN_ROOT = Path("/usr/share/man")
LICENSE_ROOT = Path("/usr/share/common-licenses")
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


@dataclass(frozen=True)
class LocalFile:
    """One candidate of the local corpus: a file (or a pydoc topic) that reads as 0+ documents."""

    key: str  # "<kind>/<relative path or topic>": stable across machines, never an absolute path
    group: str  # files of one group share a budget (GROUP_SHARE)
    path: Path | None = None  # None for a pydoc topic

    @property
    def kind(self) -> str:
        return self.key.split("/", 1)[0]

    def read(self) -> list[str]:
        name = self.key.split("/", 1)[1]
        if self.path is None:
            from pydoc_data.topics import topics

            return [topics[name]]
        text = _read_text(self.path)
        if not text:
            return []
        if self.kind == "python_stdlib":  # its docstrings as prose, then the source itself
            module = ".".join(PurePosixPath(name).with_suffix("").parts).removesuffix(".__init__")
            return [t for t in (module_docstrings(text, module), text) if t]
        if self.kind == "man":
            return [roff_to_text(text)]
        return [text]


def _read_text(path: Path) -> str | None:
    """A text file's content (gunzipped if .gz), or None if unreadable or not UTF-8 text."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError):
        return None
    return None if "\x00" in text else text.replace("\r\n", "\n")


def _sorted_walk(root: Path, skip_dirs: frozenset[str] = frozenset()) -> Iterator[Path]:
    """Regular files under `root` (no symlinks) in a sorted, machine-independent order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not path.is_symlink() and path.is_file():
                yield path


def module_docstrings(source: str, module: str) -> str:
    """The module's docstring followed by those of its classes and functions, one per paragraph."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {module}\n\n{doc}")

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    kind = "class" if isinstance(child, ast.ClassDef) else "def"
                    parts.append(f"{kind} {module}.{name}\n\n{doc}")
                visit(child, name + ".")

    visit(tree, "")
    return "\n\n".join(parts)


ROFF_SPECIALS = {
    "aq": "'", "dq": '"', "em": "--", "en": "-", "bu": "*", "co": "(c)", "lq": '"', "rq": '"',
    "oq": "'", "cq": "'", "rs": "\\", "ti": "~", "ha": "^", "mi": "-", "pl": "+", "mu": "x",
    ">=": ">=", "<=": "<=", "->": "->", "<-": "<-", "hy": "-", "ga": "`", "tm": "(TM)", "rg": "(R)",
}
ROFF_CHARS = {"-": "-", "e": "\\", " ": " ", "~": " ", "\\": "\\", "'": "'", "`": "`", ".": "."}  # others: nothing
# groups: 1 font, 2 string, 3 special "\(xx", 4 special "\[name]", 5 register, 6 any other char;
# motions and drawing (\h'..', \v'..', \w'..', ...) and sizes carry no text
ROFF_ESCAPE = re.compile(r"\\(?:f(\[[^\]]*\]|\(..|.)|s[+-]?\d+|[hvwolLDXZbxN]'[^']*'|\*(\[[^\]]*\]|\(..|.)|\((..)|\[([^\]]*)\]|n(\(..|.)|(.))")
ROFF_HEADINGS = frozenset({"SH", "SS", "Sh", "Ss"})
ROFF_PARAGRAPHS = frozenset({"PP", "P", "LP", "HP", "TP", "sp", "Pp", "Bl", "El", "Bd", "Ed"})
ROFF_ALTERNATING = frozenset({"BR", "BI", "IB", "IR", "RB", "RI"})  # fonts alternate, no spaces
ROFF_SILENT = frozenset({"TH", "RS", "RE", "PD", "UE", "ME", "EX", "EE", "YS", "TQ", "Dd", "Dt", "Os", "TS", "TE", "DT"})
MDOC_TOKEN = re.compile(r"^[A-Z][a-z]$")  # mdoc inline macros (Fl, Ar, Op, ...) inside arguments


def _roff_escape(match: re.Match) -> str:
    if match.group(3) is not None or match.group(4) is not None:
        return ROFF_SPECIALS.get(match.group(3) or match.group(4), "")
    if match.group(6) is not None:
        return ROFF_CHARS.get(match.group(6), "")
    return ""  # font, size, string and register escapes carry no text


def _roff_words(args: str) -> list[str]:
    return [w[1:-1] if len(w) >= 2 and w[0] == w[-1] == '"' else w for w in re.findall(r'"[^"]*"|\S+', args)]


def roff_to_text(source: str) -> str:
    """Man page source (man/mdoc macros) to plain text: requests dropped, text arguments kept."""
    out: list[str] = []
    in_definition = False
    for line in source.split("\n"):
        if in_definition:  # .de/.ig blocks define macros: no text
            in_definition = not line.startswith("..")
            continue
        line = line.split('\\"', 1)[0]  # comment to the end of the line
        if not line.startswith((".", "'")):
            out.append(ROFF_ESCAPE.sub(_roff_escape, line))
            continue
        macro, _, args = line[1:].strip().partition(" ")
        words = _roff_words(args)
        if macro in ("de", "de1", "ig", "am"):
            in_definition = True
        elif macro in ROFF_HEADINGS:
            out += ["", ROFF_ESCAPE.sub(_roff_escape, " ".join(words)), ""]
        elif macro in ROFF_PARAGRAPHS:
            out.append("")
        elif macro == "IP":
            out += ["", ROFF_ESCAPE.sub(_roff_escape, words[0])] if words else [""]
        elif macro in ROFF_ALTERNATING:
            out.append(ROFF_ESCAPE.sub(_roff_escape, "".join(words)))
        elif macro[:1].isupper() and macro not in ROFF_SILENT and words:
            out.append(ROFF_ESCAPE.sub(_roff_escape, " ".join(w for w in words if not MDOC_TOKEN.match(w))))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def local_candidates() -> list[LocalFile]:
    """Every candidate file of the local corpus, in a sorted, machine-independent order."""
    from pydoc_data.topics import topics

    candidates = [LocalFile(f"pydoc_topics/{name}", "pydoc_topics") for name in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in _sorted_walk(stdlib, STDLIB_SKIP_DIRS):
        if path.suffix == ".py":
            rel = path.relative_to(stdlib)
            candidates.append(LocalFile(f"python_stdlib/{rel.as_posix()}", f"python_stdlib/{rel.parts[0].removesuffix('.py')}", path))
    for path in _sorted_walk(DOC_ROOT):
        name = path.name.removesuffix(".gz")
        if name.startswith("README") or name == "copyright" or name.endswith((".txt", ".md", ".rst")):
            rel = path.relative_to(DOC_ROOT)
            candidates.append(LocalFile(f"usr_share_doc/{rel.as_posix()}", f"usr_share_doc/{rel.parts[0]}", path))
    for path in _sorted_walk(LICENSE_ROOT):
        candidates.append(LocalFile(f"common_licenses/{path.name}", "common_licenses", path))
    for section in sorted(MAN_ROOT.glob("man[0-9]*")):  # English pages only (no de/, fr/, ...)
        for path in _sorted_walk(section):
            command = re.split(r"[-_.]", path.name, maxsplit=1)[0]  # gcloud-alpha-... -> gcloud
            candidates.append(LocalFile(f"man/{section.name}/{path.name}", f"man/{command}", path))
    return candidates


def split_document(text: str, max_chars: int = DOC_CHARS) -> list[str]:
    """Cut `text` into pieces of at most `max_chars`, at paragraph (else line, else any) boundaries."""
    text = text.strip()
    if len(text) <= max_chars:
        return [text] if text else []
    pieces: list[str] = []
    for paragraph in re.split(r"(?<=\n\n)", text):
        if len(paragraph) <= max_chars:
            pieces.append(paragraph)
            continue
        for line in paragraph.splitlines(keepends=True):
            pieces += [line[i : i + max_chars] for i in range(0, len(line), max_chars)]
    chunks, current = [], ""
    for piece in pieces:
        if current and len(current) + len(piece) > max_chars:
            chunks.append(current)
            current = ""
        current += piece
    chunks.append(current)
    return [c.strip() for c in chunks if c.strip()]


def gather_local_documents(
    target_chars: int, seed: int = LOCAL_SEED, show_progress: bool = True
) -> tuple[list[list[str]], dict[str, int]]:
    """Documents of shuffled candidate files until `target_chars` (0: all), grouped per file.

    Returns (documents of each chosen file, in the shuffled order; chars per source kind).
    Identical files are kept once; no group exceeds its budget.
    """
    from tqdm import tqdm

    candidates = local_candidates()
    random.Random(seed).shuffle(candidates)
    group_budget = max(GROUP_SHARE * target_chars, MIN_GROUP_CHARS) if target_chars > 0 else float("inf")
    group_chars: dict[str, int] = {}
    kind_chars: dict[str, int] = {}
    seen: set[bytes] = set()
    per_file: list[list[str]] = []
    total = 0
    bar = tqdm(total=target_chars or None, unit="char", unit_scale=True, desc="local corpus", disable=not show_progress)
    for candidate in candidates:
        if target_chars and total >= target_chars:
            break
        if group_chars.get(candidate.group, 0) >= group_budget:
            continue
        docs, chars = [], 0
        for text in candidate.read():
            digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
            if digest in seen:
                continue
            seen.add(digest)
            for doc in split_document(text):
                room = min(target_chars - total if target_chars else float("inf"), group_budget - group_chars.get(candidate.group, 0))
                if len(doc) >= MIN_DOC_CHARS and chars < room:  # a huge file may not blow the budgets
                    docs.append(doc)
                    chars += len(doc)
        if not docs:
            continue
        per_file.append(docs)
        total += chars
        group_chars[candidate.group] = group_chars.get(candidate.group, 0) + chars
        kind_chars[candidate.kind] = kind_chars.get(candidate.kind, 0) + chars
        bar.update(chars)
    bar.close()
    return per_file, dict(sorted(kind_chars.items()))


def local_shards(
    target_mb: float = 40,
    val_fraction: float = 0.05,
    shard_mb: float = 8,
    seed: int = LOCAL_SEED,
    show_progress: bool = True,
) -> tuple[list[list[str]], dict]:
    """The documents of each shard (train shards of ~`shard_mb` MB of text, then the val shard)
    and a summary {"seed", "target_mb", "num_docs", "chars_by_source"}.

    The last shard holds the held-out files: ~`val_fraction` of the documents, at least
    MIN_VAL_DOCS (at most half of them); train and val never share a file.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if target_mb < 0 or shard_mb <= 0:
        raise ValueError(f"target_mb must be >= 0 and shard_mb > 0, got {target_mb} and {shard_mb}")
    per_file, kind_chars = gather_local_documents(int(target_mb * 1e6), seed, show_progress)
    if len(per_file) < 2:
        raise RuntimeError(f"found {len(per_file)} files of readable text on this machine; need at least 2 (train + val)")
    num_docs = sum(len(docs) for docs in per_file)
    val_docs_wanted = min(max(round(val_fraction * num_docs), MIN_VAL_DOCS), num_docs // 2)
    val: list[str] = []
    while len(val) < val_docs_wanted and len(per_file) > 1:
        val += per_file.pop()  # held-out files come from the end of the shuffled order
    train = [doc for docs in per_file for doc in docs]
    rng = random.Random(seed + 1)  # documents of one long file should not sit side by side
    rng.shuffle(train)
    rng.shuffle(val)
    shards: list[list[str]] = [[]]
    shard_chars = 0
    for doc in train:
        if shard_chars >= shard_mb * 1e6:
            shards.append([])
            shard_chars = 0
        shards[-1].append(doc)
        shard_chars += len(doc)
    shards.append(val)
    return shards, {"seed": seed, "target_mb": target_mb, "num_docs": num_docs, "chars_by_source": kind_chars}
