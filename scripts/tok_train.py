"""Train the BPE tokenizer on the pretraining shards: python -m scripts.tok_train

Cached: a tokenizer directory whose meta.json has the requested --vocab_size is reused unless
--force. Writes tokenizer.json, token_bytes.pt and, last, meta.json (each atomically) into
$NANOCHAT_BASE_DIR/tokenizer. --convert_legacy rewrites an old tokenizer.pkl there as tokenizer.json
(the same ids, so existing checkpoints keep working) and exits.
"""

from __future__ import annotations

import json
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from nanochat.common import atomic_write, print0, run_main
from nanochat.config import Flags, UserError, check, parse_args
from nanochat.dataset import iter_texts
from nanochat.report import log_section
from nanochat.tokenizer import (LEGACY_TOKENIZER_FILE, META_FILE, SPECIAL_TOKENS, TOKEN_BYTES_FILE, TOKENIZER_FILE, Tokenizer,
                                default_tokenizer_dir)


@dataclass
class TokTrainConfig(Flags):
    """Train the BPE tokenizer (rustbpe) on the train split of the pretraining shards."""

    max_chars: int = field(default=2_000_000_000, metadata={"help": "train on at most this many characters"})
    doc_cap: int = field(default=10_000, metadata={"help": "use at most this many characters of each document"})
    vocab_size: int = field(default=65536, metadata={"help": "total vocabulary: 256 bytes + merges + 9 special tokens"})
    force: bool = field(default=False, metadata={"help": "retrain even if a tokenizer with this vocab_size exists"})
    convert_legacy: bool = field(default=False, metadata={"help": "rewrite the old tokenizer.pkl as tokenizer.json and exit"})

    def validate(self) -> None:
        super().validate()
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


class PlainValuesUnpickler(pickle.Unpickler):
    """Loads only plain values (dict, str, bytes, int): every class or function lookup, the only way
    a pickle runs code, is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise UserError(f"{LEGACY_TOKENIZER_FILE} refers to {module}.{name}: not a nanochat tokenizer pickle, not loaded")


def convert_legacy(directory: Path) -> dict[str, Any]:
    """tokenizer.pkl (the format before tokenizer.json) -> tokenizer.json + token_bytes.pt, same ids."""
    path = directory / LEGACY_TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"--convert_legacy: no {path} to convert")
    try:
        with open(path, "rb") as f:
            pieces = PlainValuesUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise UserError(f"--convert_legacy: cannot read {path}: {type(e).__name__}: {e}") from e
    if not isinstance(pieces, dict) or not {"pattern", "mergeable_ranks", "special_tokens"} <= set(pieces):
        raise UserError(f"--convert_legacy: {path} is not a nanochat tokenizer (expected pattern, mergeable_ranks, special_tokens)")
    tokenizer = Tokenizer(pieces["mergeable_ranks"], pieces["pattern"])
    if pieces["special_tokens"] != tokenizer.special_ids:
        raise UserError(f"--convert_legacy: {path} has special tokens {pieces['special_tokens']}, expected {tokenizer.special_ids}")
    tokenizer.save(directory)
    print0(f"converted {path} to {directory / TOKENIZER_FILE} ({tokenizer.get_vocab_size()} tokens, same ids); "
           f"{path.name} can be deleted")
    return {"converted": str(directory / TOKENIZER_FILE), "vocab_size": tokenizer.get_vocab_size()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(TokTrainConfig, argv, prog="python -m scripts.tok_train")
    if cfg.convert_legacy:
        return run_main(lambda _: convert_legacy(default_tokenizer_dir()), cfg)
    return run_main(train, cfg)


def train(cfg: TokTrainConfig) -> dict[str, Any]:
    directory = default_tokenizer_dir()
    meta = None if cfg.force else cached_meta(directory, cfg.vocab_size)
    if meta is not None:
        print0(f"tokenizer with vocab_size={cfg.vocab_size} already at {directory}: reusing it (--force to retrain)")
        return meta

    tally = {"docs": 0, "chars": 0}
    t0 = time.perf_counter()
    # no shards yet: FileNotFoundError, whose message says how to make them
    tokenizer = Tokenizer.train_from_iterator(counted(iter_texts("train", cfg.max_chars, cfg.doc_cap), tally), cfg.vocab_size)
    train_time = time.perf_counter() - t0
    if tally["chars"] == 0:
        raise UserError("no training text in the train split: build the shards first (python -m nanochat.dataset)")
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
