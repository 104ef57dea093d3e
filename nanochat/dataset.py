"""Pretraining shards: download them (online) or build them from text on this machine (offline),
and iterate over their documents.

    python -m nanochat.dataset -n 8                  # FineWeb-Edu shards 0..7 + the val shard
    python -m nanochat.dataset --source=local        # offline corpus from this machine's text
    python -m nanochat.dataset                       # auto: online if reachable, else local

Layout: `$NANOCHAT_BASE_DIR/base_data/shard_{index:05d}.parquet`, one string column `text`, one
document per row. The LAST shard (highest index) is the validation split, all others are train:
online that is `shard_01822.parquet` (downloaded along with shards 0..N-1), offline the local
corpus puts its held-out documents in its last shard too.

Local corpus: documents are the pydoc topics, the docstrings and sources of the standard library,
and the readable docs under /usr/share (READMEs, copyright files, licenses, English man pages).
Candidate files are listed in sorted order, shuffled with a fixed seed and read until
`--target_mb` of text is gathered; no "group" (a stdlib package, a Debian package's docs, the man
pages of one command family such as gcloud-*) may take more than GROUP_SHARE of the total. Two
builds on the same machine are byte-identical; the content differs between machines.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import random
import re
import sysconfig
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import fail, get_base_dir, print0
from nanochat.config import check, parse_args
from nanochat.download import DownloadError, download_file, temp_path

DEFAULT_BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
MAX_SHARD_INDEX = 1822  # FineWeb-Edu 100B shuffled: shards 0..1822, the last one is validation
SHARD_GLOB = "shard_*.parquet"
MANIFEST = "manifest.json"
NO_SHARDS_HINT = "run `python -m nanochat.dataset --source=local` (offline) or `python -m nanochat.dataset -n 8`"

LOCAL_SEED = 1234
DOC_CHARS = 16_000  # long files are cut into documents of at most this many chars, at paragraphs
MIN_DOC_CHARS = 100  # shorter documents (`.so` man redirects, stubs) are dropped
MIN_VAL_DOCS = 128  # the val shard gets at least this many documents, whatever --target_mb
GROUP_SHARE = 0.05  # one group takes at most this share of the target ...
MIN_GROUP_CHARS = 1_000_000  # ... or this many chars, whichever is larger
ROW_GROUP_DOCS = 1024
DOC_ROOT = Path("/usr/share/doc")
MAN_ROOT = Path("/usr/share/man")
LICENSE_ROOT = Path("/usr/share/common-licenses")
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


class CorruptShardError(ValueError):
    """A shard that cannot be read; the message names the file and how to fix it."""


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def default_data_dir() -> Path:
    return get_base_dir() / "base_data"


# ---------------------------------------------------------------------------------------------
# reading shards

def list_parquet_files(data_dir: Path | None = None) -> list[Path]:
    """All shards in `data_dir` (default $NANOCHAT_BASE_DIR/base_data), sorted by index."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    files = sorted(data_dir.glob(SHARD_GLOB))
    if not files:
        raise FileNotFoundError(f"no shards in {data_dir}: {NO_SHARDS_HINT}")
    return files


def split_files(split: str, data_dir: Path | None = None) -> list[Path]:
    """'train' = every shard but the last, 'val' = the last one."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    files = list_parquet_files(data_dir)
    if len(files) < 2:
        found = f"found {files[0].name} only"
        raise FileNotFoundError(f"need at least 2 shards (train + val) in {files[0].parent}, {found}: {NO_SHARDS_HINT}")
    return files[:-1] if split == "train" else files[-1:]


def open_shard(path: Path) -> pq.ParquetFile:
    """The shard as a ParquetFile with a `text` column, or an error naming the file."""
    try:
        shard = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise CorruptShardError(f"corrupt parquet shard {path}: {e} (delete it and re-run `python -m nanochat.dataset`)") from e
    if "text" not in shard.schema_arrow.names:
        raise CorruptShardError(f"shard {path} has no 'text' column (columns: {shard.schema_arrow.names})")
    return shard


def iter_row_groups(
    split: str,
    start: tuple[int, int] = (0, 0),
    rank: int = 0,
    world_size: int = 1,
    data_dir: Path | None = None,
) -> Iterator[tuple[list[str], tuple[int, int]]]:
    """One pass over the split's row groups: yields (texts, (file_idx, row_group_idx)).

    Row groups are dealt round-robin to ranks by their global index in the split, so ranks read
    disjoint data whose union is the whole split. `start` is the position to resume from
    (inclusive); a rank resuming from a position it was given gets the same sequence again.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    start_file, start_rg = start
    if start_file < 0 or start_rg < 0:
        raise ValueError(f"start must be a non-negative (file_idx, row_group_idx), got {start}")
    files = split_files(split, data_dir)
    global_index = sum(open_shard(path).num_row_groups for path in files[:start_file])
    for file_idx in range(start_file, len(files)):
        path = files[file_idx]
        shard = open_shard(path)
        first = start_rg if file_idx == start_file else 0
        global_index += min(first, shard.num_row_groups)
        for rg_idx in range(first, shard.num_row_groups):
            if global_index % world_size == rank:
                try:
                    texts = shard.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()
                except (pa.ArrowException, OSError) as e:
                    raise CorruptShardError(f"corrupt parquet shard {path}: row group {rg_idx}: {e}") from e
                yield texts, (file_idx, rg_idx)
            global_index += 1


def iter_texts(
    split: str, max_chars: int | None = None, doc_cap: int | None = None, data_dir: Path | None = None
) -> Iterator[str]:
    """Documents of the split in order (for the tokenizer trainer): each cut to `doc_cap` chars,
    stopping once `max_chars` chars in total were yielded."""
    total = 0
    for texts, _ in iter_row_groups(split, data_dir=data_dir):
        for text in texts:
            if max_chars is not None and total >= max_chars:
                return
            if doc_cap is not None:
                text = text[:doc_cap]
            total += len(text)
            yield text


# ---------------------------------------------------------------------------------------------
# online: download shards

def check_parquet(path: Path) -> None:
    """Validation for downloads: a readable parquet file with a string `text` column."""
    schema = pq.ParquetFile(path).schema_arrow
    if "text" not in schema.names:
        raise ValueError(f"no 'text' column (columns: {schema.names})")
    if not pa.types.is_string(schema.field("text").type) and not pa.types.is_large_string(schema.field("text").type):
        raise ValueError(f"'text' column has type {schema.field('text').type}, expected string")


def shard_indices(num_files: int, val_index: int = MAX_SHARD_INDEX) -> list[int]:
    """Train shards 0..num_files-1 (-1: all of them) followed by the val shard."""
    if num_files == -1:
        num_files = val_index
    if not 0 <= num_files <= val_index:
        raise ValueError(f"num_files must be -1 (all) or in [0, {val_index}], got {num_files}")
    return list(range(num_files)) + [val_index]


def download_shards(
    indices: list[int],
    base_url: str,
    data_dir: Path,
    num_workers: int = 4,
    retries: int = 5,
    backoff: float = 1.0,
) -> dict[int, str]:
    """Download the missing shards in parallel; returns {index: reason} for the ones that failed."""
    from tqdm import tqdm

    data_dir.mkdir(parents=True, exist_ok=True)
    missing = [i for i in indices if not (data_dir / shard_name(i)).exists()]
    print0(f"{len(indices) - len(missing)}/{len(indices)} shards in {data_dir}, downloading {len(missing)} from {base_url}")
    failed: dict[int, str] = {}
    if not missing:
        return failed
    base_url = base_url.rstrip("/")
    pool = ThreadPoolExecutor(max_workers=num_workers)
    try:
        futures = {
            pool.submit(download_file, f"{base_url}/{shard_name(i)}", data_dir / shard_name(i), check_parquet, retries, backoff): i
            for i in missing
        }
        for future in tqdm(as_completed(futures), total=len(futures), desc="shards", unit="shard"):
            try:
                future.result()
            except DownloadError as e:
                failed[futures[future]] = e.reason
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # Ctrl-C: start no new downloads
    return failed


def network_reachable(url: str, timeout: float = 5.0) -> bool:
    """True if `url`'s server answers at all (any HTTP status counts as reachable)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# offline: build a corpus from text on this machine

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


def write_shard(texts: list[str], path: Path, row_group_docs: int = ROW_GROUP_DOCS) -> None:
    """A parquet shard with one string column `text`, written atomically."""
    tmp = temp_path(path)
    try:
        table = pa.table({"text": pa.array(texts, type=pa.string())})
        pq.write_table(table, tmp, row_group_size=row_group_docs, compression="zstd")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def clear_shards(data_dir: Path) -> None:
    """Remove the manifest first (an incomplete corpus must not look complete), then the shards."""
    (data_dir / MANIFEST).unlink(missing_ok=True)
    for path in data_dir.glob(SHARD_GLOB):
        path.unlink()


def build_local_corpus(
    out_dir: Path,
    target_mb: float = 40,
    val_fraction: float = 0.05,
    shard_mb: float = 8,
    row_group_docs: int = ROW_GROUP_DOCS,
    seed: int = LOCAL_SEED,
    show_progress: bool = True,
) -> dict:
    """Write the local corpus into `out_dir` (shards, then manifest.json); returns the manifest.

    The last shard holds the held-out files: ~`val_fraction` of the documents, at least
    MIN_VAL_DOCS (at most half of them); train and val never share a file.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if target_mb < 0 or shard_mb <= 0:
        raise ValueError(f"target_mb must be >= 0 and shard_mb > 0, got {target_mb} and {shard_mb}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
    manifest = {"source": "local", "seed": seed, "target_mb": target_mb, "num_docs": num_docs, "chars_by_source": kind_chars}
    manifest["shards"] = []
    for index, texts in enumerate(shards):
        write_shard(texts, out_dir / shard_name(index), row_group_docs)
        split = "val" if index == len(shards) - 1 else "train"
        manifest["shards"].append({"file": shard_name(index), "split": split, "docs": len(texts), "chars": sum(map(len, texts))})
    tmp = temp_path(out_dir / MANIFEST)
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / MANIFEST)
    return manifest


# ---------------------------------------------------------------------------------------------
# command line

@dataclass
class DatasetConfig:
    """Download FineWeb-Edu pretraining shards, or build a local corpus offline."""

    num_files: int = field(default=8, metadata={"short": "-n", "help": f"train shards to download (-1: all {MAX_SHARD_INDEX}); plus the val shard"})
    num_workers: int = field(default=4, metadata={"short": "-w", "help": "parallel downloads"})
    base_url: str = field(
        default_factory=lambda: os.environ.get("NANOCHAT_DATA_URL", DEFAULT_BASE_URL),
        metadata={"help": "where shard_XXXXX.parquet live (default from env NANOCHAT_DATA_URL if set)"},
    )
    source: str = field(default="auto", metadata={"choices": ("auto", "online", "local"), "help": "auto: online if base_url answers, else local"})
    val_index: int = field(default=MAX_SHARD_INDEX, metadata={"help": "index of the val shard online (for mirrors and tests)"})
    retries: int = field(default=5, metadata={"help": "download retries per shard"})
    backoff: float = field(default=2.0, metadata={"help": "seconds before the first retry, doubling each time"})
    target_mb: float = field(default=40, metadata={"help": "local: MB of text to gather (0: all there is)"})
    shard_mb: float = field(default=8, metadata={"help": "local: MB of text per train shard"})
    val_fraction: float = field(default=0.05, metadata={"help": f"local: share of documents held out in the last shard (>= {MIN_VAL_DOCS})"})
    force: bool = field(default=False, metadata={"help": "replace the shards already in base_data"})

    def validate(self) -> None:
        check(self.num_files >= -1, f"--num_files: expected -1 (all) or >= 0, got {self.num_files}")
        check(self.num_files <= self.val_index, f"--num_files: at most {self.val_index} train shards exist, got {self.num_files}")
        check(self.num_workers >= 1, f"--num_workers: expected >= 1, got {self.num_workers}")
        check(self.val_index >= 0, f"--val_index: expected >= 0, got {self.val_index}")
        check(self.retries >= 0 and self.backoff >= 0, f"--retries/--backoff: expected >= 0, got {self.retries}/{self.backoff}")
        check(self.target_mb >= 0, f"--target_mb: expected >= 0, got {self.target_mb}")
        check(self.shard_mb > 0, f"--shard_mb: expected > 0, got {self.shard_mb}")
        check(0 < self.val_fraction < 1, f"--val_fraction: expected a number in (0, 1), got {self.val_fraction}")


def read_manifest(data_dir: Path) -> dict | None:
    path = data_dir / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def run_online(cfg: DatasetConfig, data_dir: Path) -> None:
    if read_manifest(data_dir) is not None:
        if not cfg.force:
            fail(f"{data_dir} holds the local corpus; --force replaces it with downloaded shards, --source=local keeps it")
        clear_shards(data_dir)
    indices = shard_indices(cfg.num_files, cfg.val_index)
    failed = download_shards(indices, cfg.base_url, data_dir, cfg.num_workers, cfg.retries, cfg.backoff)
    if failed:
        for index, reason in sorted(failed.items()):
            print0(f"  failed: {shard_name(index)}: {reason}")
        names = ", ".join(shard_name(i) for i in sorted(failed))
        fail(f"{len(failed)} of {len(indices)} shards failed: {names}; re-run to resume")
    print0(f"{len(indices)} shards ready in {data_dir}")


def run_local(cfg: DatasetConfig, data_dir: Path) -> None:
    existing = sorted(data_dir.glob(SHARD_GLOB)) if data_dir.is_dir() else []
    manifest = read_manifest(data_dir)
    if existing and not cfg.force:
        if manifest is not None:
            print0(f"local corpus already in {data_dir} ({manifest['num_docs']} docs); --force rebuilds it")
            return
        fail(f"{data_dir} holds {len(existing)} shards but no {MANIFEST} (downloaded, or an interrupted local build); --force replaces them")
    if cfg.force:
        clear_shards(data_dir)
    manifest = build_local_corpus(data_dir, cfg.target_mb, cfg.val_fraction, cfg.shard_mb)
    total = sum(s["chars"] for s in manifest["shards"])
    by_source = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in manifest["chars_by_source"].items())
    shards = len(manifest["shards"])
    print0(f"local corpus: {manifest['num_docs']} docs, {total / 1e6:.1f}M chars in {shards} shards ({by_source}) -> {data_dir}")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(DatasetConfig, argv, prog="python -m nanochat.dataset")
    data_dir = default_data_dir()
    source = cfg.source
    if source == "auto" and read_manifest(data_dir) is not None:
        source = "local"  # a local corpus is already here: keep it (--source=online replaces it)
    if source == "auto":
        source = "online" if network_reachable(cfg.base_url) else "local"
        if source == "local":
            print0(f"{cfg.base_url} is unreachable: building the local corpus instead (--source=local)")
    if source == "online":
        run_online(cfg, data_dir)
    else:
        run_local(cfg, data_dir)


if __name__ == "__main__":
    main()
