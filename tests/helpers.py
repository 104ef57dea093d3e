"""Shared test setup: a tiny corpus and tokenizer in a base dir, built once per session."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.tokenizer import Tokenizer

WORDS = ("the model learns to predict the next token from the previous ones while the optimizer "
         "follows the gradient and memory is saved by low rank factors of every weight update").split()


def tiny_corpus_texts(num_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))).capitalize() + "." for _ in range(rng.randint(2, 6))]
        docs.append(" ".join(sentences))
    return docs


def build_tiny_base_dir(base: Path, vocab_size: int = 512) -> Path:
    """Two train shards + one val shard of synthetic text, and a trained tokenizer."""
    data = base / "base_data"
    data.mkdir(parents=True, exist_ok=True)
    for index in range(3):
        texts = tiny_corpus_texts(300, seed=index)
        pq.write_table(pa.table({"text": texts}), data / f"shard_{index:05d}.parquet", row_group_size=64)
    tokenizer = Tokenizer.train_from_iterator(tiny_corpus_texts(300, seed=99), vocab_size)
    tokenizer.save(base / "tokenizer")
    return base


def train_tiny_base(base: Path, steps: int, tag: str = "tiny") -> Path:
    """A tiny corpus, tokenizer and depth-1 base model (checkpoint tag `tag`) in `base`."""
    import os

    from scripts import base_train

    build_tiny_base_dir(base)
    previous = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(base)
    try:
        base_train.main(["--depth=1", "--max_seq_len=32", "--device_batch_size=4", "--total_batch_size=256",
                         f"--num_iterations={steps}", "--eval_every=-1", "--sample_every=-1", "--threads=1",
                         "--dtype=float32", f"--model_tag={tag}"])
    finally:
        if previous is None:
            os.environ.pop("NANOCHAT_BASE_DIR")
        else:
            os.environ["NANOCHAT_BASE_DIR"] = previous
    return base
