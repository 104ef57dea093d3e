"""Compression of our tokenizer vs GPT-2 and GPT-4: python -m scripts.tok_eval

Bytes per token (higher = better compression) on a few kinds of text and on the first
documents of the local train and val shards. The reference tokenizers come from tiktoken,
which downloads them on first use; offline (and not cached) their columns are left out.
Results: returned by main() and logged to the report card (nanochat.report).
"""

from __future__ import annotations

import itertools
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

import tiktoken

from nanochat.common import print0, run_main
from nanochat.config import Flags, check, parse_args
from nanochat.dataset import iter_texts
from nanochat.report import log_section
from nanochat.tokenizer import get_tokenizer

REFERENCES = {"gpt2": ("GPT-2", "gpt2"), "gpt4": ("GPT-4", "cl100k_base")}  # column: (label, tiktoken name)
DOWNLOAD_TIMEOUT_S = 15.0

NEWS_TEXT = """The city council voted 7-2 on Tuesday night to approve a $48 million plan to rebuild the \
harbor bridge, ending nearly three years of debate over the aging structure. Mayor Elena Ruiz said \
construction would begin next spring and should take about 30 months. "This bridge carries 40,000 \
cars a day, and it was never designed for that," she told reporters after the meeting. Opponents \
argued the city should first repair the existing span, which engineers rated "poor" in a 2022 \
inspection. Traffic will be diverted to the Fifth Street crossing during the work."""

KOREAN_CJK_TEXT = """오늘 서울의 날씨는 맑고 기온은 섭씨 24도까지 오르겠습니다. 주말에는 전국에 비가 내릴 \
것으로 예상됩니다. 한국어는 한글이라는 고유한 문자를 사용하며, 세종대왕이 1443년에 창제했습니다.
东京是日本的首都，也是世界上人口最多的都市圈之一。今天我们学习了机器学习的基本概念。
日本語の文章には、ひらがな、カタカナ、そして漢字が混ざっています。"""

CODE_TEXT = '''class LRUCache:
    """A fixed-size cache that evicts the least recently used entry."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: dict[str, int] = {}

    def get(self, key: str) -> int | None:
        if key not in self.items:
            return None
        value = self.items.pop(key)
        self.items[key] = value  # move to the end: most recently used
        return value

    def put(self, key: str, value: int) -> None:
        self.items.pop(key, None)
        if len(self.items) >= self.capacity:
            del self.items[next(iter(self.items))]
        self.items[key] = value
'''

MATH_TEXT = r"""\begin{theorem}[Cauchy--Schwarz]
For all vectors $u, v$ in an inner product space, $|\langle u, v \rangle|^2 \le \langle u, u \rangle \cdot \langle v, v \rangle$.
\end{theorem}
\begin{proof}
If $v = 0$ both sides vanish. Otherwise let $\lambda = \frac{\langle u, v \rangle}{\langle v, v \rangle}$; then
$0 \le \| u - \lambda v \|^2 = \langle u, u \rangle - \frac{|\langle u, v \rangle|^2}{\langle v, v \rangle}$,
and the claim follows. For example, $\sum_{i=1}^{n} x_i y_i \le \sqrt{\sum_{i=1}^{n} x_i^2} \sqrt{\sum_{i=1}^{n} y_i^2}$.
\end{proof}"""

SCIENCE_TEXT = """Photosynthesis converts light energy into chemical energy stored in glucose. In the light-\
dependent reactions, which take place in the thylakoid membranes of the chloroplast, photons excite \
electrons in chlorophyll; water is split, releasing oxygen as a by-product. The resulting ATP and \
NADPH drive the Calvin cycle in the stroma, where the enzyme RuBisCO fixes carbon dioxide into \
three-carbon sugars. Because RuBisCO also reacts with oxygen, a process called photorespiration, \
some plants in hot climates evolved C4 and CAM pathways that concentrate CO2 around the enzyme."""

SAMPLE_TEXTS = {"news": NEWS_TEXT, "korean_cjk": KOREAN_CJK_TEXT, "code": CODE_TEXT, "math": MATH_TEXT, "science": SCIENCE_TEXT}


@dataclass
class TokEvalConfig(Flags):
    """Bytes per token of our tokenizer vs GPT-2 and GPT-4 on sample texts and the local shards."""

    num_docs: int = field(default=100, metadata={"help": "documents from each of the train and val splits"})

    def validate(self) -> None:
        super().validate()
        check(self.num_docs >= 0, f"--num_docs: expected >= 0, got {self.num_docs}")


def load_reference(name: str, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> tiktoken.Encoding:
    """tiktoken.get_encoding(name), giving up after timeout_s (the download has no timeout of its
    own: a network that drops packets would hang it, so it runs in a daemon thread)."""
    result: dict[str, Any] = {}

    def load() -> None:
        try:
            result["encoding"] = tiktoken.get_encoding(name)
        except Exception as e:  # reported to the caller below
            result["error"] = e

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        thread = threading.Thread(target=load, name=f"tiktoken-{name}", daemon=True)
        thread.start()
        thread.join(timeout_s)
    finally:
        socket.setdefaulttimeout(previous)
    if "encoding" in result:
        return result["encoding"]
    raise result.get("error") or TimeoutError(f"tiktoken.get_encoding({name!r}) took more than {timeout_s}s")


def split_sample(split: str, num_docs: int) -> str | None:
    """The first num_docs documents of a local split joined into one text; None without shards."""
    try:
        docs = list(itertools.islice(iter_texts(split), num_docs))
    except FileNotFoundError as e:
        print0(f"{split} split unavailable, leaving it out: {e}")
        return None
    return "\n".join(docs) if docs else None


def format_table(results: dict[str, Any]) -> str:
    columns = results["tokenizers"]
    header = f"{'text':<12} {'bytes':>9}" + "".join(f" {c + ' tok':>10} {c + ' B/t':>9}" for c in columns)
    refs = [c for c in columns if c != "ours"]
    header += "".join(f" {'vs ' + c:>9}" for c in refs)
    lines = [header, "-" * len(header)]
    for name, row in results["texts"].items():
        line = f"{name:<12} {row['bytes']:>9,}"
        line += "".join(f" {row[c]['tokens']:>10,} {row[c]['bytes_per_token']:>9.2f}" for c in columns)
        # relative token count: +10% = we need 10% fewer tokens than the reference
        line += "".join(f" {100 * (row[c]['tokens'] - row['ours']['tokens']) / max(row[c]['tokens'], 1):>+8.1f}%" for c in refs)
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(TokEvalConfig, argv, prog="python -m scripts.tok_eval")
    return run_main(evaluate, cfg)


def evaluate(cfg: TokEvalConfig) -> dict[str, Any]:
    ours = get_tokenizer()
    encoders = {"ours": ours.encode}
    vocab_sizes = {"ours": ours.get_vocab_size()}
    unavailable = {}
    for column, (label, name) in REFERENCES.items():
        try:
            reference = load_reference(name)
        except Exception as e:  # offline, timeout, corrupt cache: the comparison goes on without it
            unavailable[column] = f"{type(e).__name__}: {e}"
            continue
        encoders[column] = reference.encode_ordinary
        vocab_sizes[column] = reference.n_vocab
    for column in unavailable:
        consequence = "comparing against ours only" if len(encoders) == 1 else "leaving out its column"
        print0(f"{REFERENCES[column][0]} tokenizer unavailable offline (tiktoken could not download it): {consequence}")

    texts = dict(SAMPLE_TEXTS)
    for split in ("train", "val"):
        sample = split_sample(split, cfg.num_docs) if cfg.num_docs else None
        if sample is not None:
            texts[f"{split}_shard"] = sample

    rows = {}
    for name, text in texts.items():
        n_bytes = len(text.encode("utf-8"))
        rows[name] = {"bytes": n_bytes}
        for column, encode in encoders.items():
            n_tokens = len(encode(text))
            rows[name][column] = {"tokens": n_tokens, "bytes_per_token": n_bytes / max(n_tokens, 1)}
    results = {"tokenizers": list(encoders), "vocab_size": vocab_sizes, "unavailable": unavailable, "texts": rows}

    print0("vocab sizes: " + ", ".join(f"{c}={v:,}" for c, v in vocab_sizes.items()))
    print0(format_table(results))
    if len(encoders) > 1:
        print0("B/t = bytes per token (higher compresses better); vs X = % fewer tokens than X (negative: more)")
    summary = {f"{name} bytes/token ({column})": row[column]["bytes_per_token"] for name, row in rows.items() for column in encoders}
    log_section("Tokenizer evaluation", {**summary, "unavailable": unavailable or "none"})
    return results


if __name__ == "__main__":
    main()
