"""Train the BPE tokenizer on the pretraining shards: python -m scripts.tok_train

Cached: a tokenizer directory whose meta.json has the requested --vocab_size is reused unless
--force. Writes tokenizer.pkl, token_bytes.pt and, last, meta.json (each atomically) into
$NANOCHAT_BASE_DIR/tokenizer.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from nanochat.common import atomic_write, fail, print0
from nanochat.config import check, parse_args
from nanochat.dataset import iter_texts
from nanochat.report import log_section
from nanochat.tokenizer import META_FILE, SPECIAL_TOKENS, TOKEN_BYTES_FILE, TOKENIZER_FILE, Tokenizer, default_tokenizer_dir


@dataclass
class TokTrainConfig:
    """Train the BPE tokenizer (rustbpe) on the train split of the pretraining shards."""

    max_chars: int = field(default=2_000_000_000, metadata={"help": "train on at most this many characters"})
    doc_cap: int = field(default=10_000, metadata={"help": "use at most this many characters of each document"})
    vocab_size: int = field(default=65536, metadata={"help": "total vocabulary: 256 bytes + merges + 9 special tokens"})
    force: bool = field(default=False, metadata={"help": "retrain even if a tokenizer with this vocab_size exists"})

    def validate(self) -> None:
        min_size = 256 + len(SPECIAL_TOKENS)
        check(self.vocab_size >= min_size, f"--vocab_size: expected >= {min_size} (256 bytes + 9 special tokens), got {self.vocab_size}")
        check(self.max_chars > 0, f"--max_chars: expected > 0, got {self.max_chars}")
        check(self.doc_cap > 0, f"--doc_cap: expected > 0, got {self.doc_cap}")


def cached_meta(directory: Path, vocab_size: int) -> dict[str, Any] | None:
    """The meta of a complete tokenizer in `directory` trained for `vocab_size`, else None."""
    if not all((directory / name).is_file() for name in (TOKENIZER_FILE, TOKEN_BYTES_FILE)):
        return None
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("vocab_size") != vocab_size:
        return None
    return meta


def counted(texts: Iterator[str], tally: dict[str, int]) -> Iterator[str]:
    """Pass `texts` through, counting documents and characters into `tally`."""
    for text in texts:
        tally["docs"] += 1
        tally["chars"] += len(text)
        yield text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(TokTrainConfig, argv, prog="python -m scripts.tok_train")
    directory = default_tokenizer_dir()
    meta = None if cfg.force else cached_meta(directory, cfg.vocab_size)
    if meta is not None:
        print0(f"tokenizer with vocab_size={cfg.vocab_size} already at {directory}: reusing it (--force to retrain)")
        return meta

    tally = {"docs": 0, "chars": 0}
    t0 = time.perf_counter()
    try:
        tokenizer = Tokenizer.train_from_iterator(counted(iter_texts("train", cfg.max_chars, cfg.doc_cap), tally), cfg.vocab_size)
    except FileNotFoundError as e:  # no shards yet: the message says how to make them
        fail(str(e))
    train_time = time.perf_counter() - t0
    if tally["chars"] == 0:
        fail("no training text in the train split: build the shards first (python -m nanochat.dataset)")
    print0(f"trained on {tally['docs']:,} documents, {tally['chars']:,} characters in {train_time:.2f}s "
           f"({tally['chars'] / train_time / 1e6:.2f}M chars/s)")
    if tokenizer.get_vocab_size() < cfg.vocab_size:
        print0(f"warning: the corpus only supports {tokenizer.get_vocab_size()} tokens, fewer than --vocab_size={cfg.vocab_size}")

    (directory / META_FILE).unlink(missing_ok=True)  # no meta = incomplete, should we stop half-way
    tokenizer.save(directory)
    meta = {
        "vocab_size": cfg.vocab_size,
        "vocab_size_actual": tokenizer.get_vocab_size(),
        "train_docs": tally["docs"],
        "train_chars": tally["chars"],
        "train_time_s": train_time,
        "chars_per_s": tally["chars"] / train_time,
        "max_chars": cfg.max_chars,
        "doc_cap": cfg.doc_cap,
    }
    atomic_write(directory / META_FILE, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    print0(f"saved tokenizer (vocab_size={tokenizer.get_vocab_size()}) to {directory}")
    log_section("Tokenizer training", meta)
    return meta


if __name__ == "__main__":
    main()
