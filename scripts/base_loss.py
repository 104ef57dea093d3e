"""Bits per byte of a trained model on the train and val splits, plus a few greedy samples.

    python -m scripts.base_loss --model_tag=d6 --split_tokens=65536
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from nanochat.checkpoint import load_chat_model
from nanochat.common import RunContext, print0, run_main
from nanochat.config import CheckpointFlags, RuntimeFlags, check, parse_args, source_field
from nanochat.dataloader import DataLoader
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import log_section

SAMPLE_PROMPTS = ("The capital of France is", "import os\n", "If 5*x + 3 = 13, then x is", "The opposite of hot is")


@dataclass
class BaseLossConfig(RuntimeFlags, CheckpointFlags):
    """Evaluate bits per byte of a checkpoint."""

    source: str = source_field("base")
    device_batch_size: int = field(default=8, metadata={"help": "sequences per forward pass"})
    split_tokens: int = field(default=65536, metadata={"help": "tokens evaluated per split"})
    sample_tokens: int = field(default=24, metadata={"help": "tokens generated per sample (0 = no samples)"})

    def validate(self) -> None:
        super().validate()
        check(self.device_batch_size >= 1, f"--device_batch_size: expected >= 1, got {self.device_batch_size}")
        check(self.split_tokens >= 1, f"--split_tokens: expected >= 1, got {self.split_tokens}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(BaseLossConfig, argv, prog="python -m scripts.base_loss")
    return run_main(evaluate, cfg)


def evaluate(cfg: BaseLossConfig, ctx: RunContext) -> dict[str, Any]:
    model, tokenizer, meta = load_chat_model(cfg, ctx.device, "float32")  # float32 weights; autocast computes in --dtype
    token_bytes = tokenizer.token_bytes().to(ctx.device)
    forward = torch.compile(model, dynamic=False) if cfg.compile else model
    seq_len = model.config.sequence_len
    steps = max(1, cfg.split_tokens // (cfg.device_batch_size * seq_len * ctx.world_size))
    results: dict[str, Any] = {"checkpoint": meta["checkpoint_dir"], "step": meta["step"]}
    for split in ("train", "val"):
        loader = DataLoader(tokenizer, cfg.device_batch_size, seq_len, split, ctx.device, ctx.rank, ctx.world_size, loop=True)
        results[f"{split}_bpb"] = evaluate_bpb(forward, loader, steps, token_bytes, ctx)
        print0(f"{split} bpb: {results[f'{split}_bpb']:.4f}  ({steps * cfg.device_batch_size * seq_len:,} tokens)")
    samples = []
    if ctx.master and cfg.sample_tokens > 0:
        for prompt in SAMPLE_PROMPTS:
            ids = model.generate(tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id()), max_tokens=cfg.sample_tokens, temperature=0.0)
            samples.append(prompt + tokenizer.decode(ids))
            print0(f"sample: {samples[-1]!r}")
    results["samples"] = samples
    log_section("Base model loss", {"checkpoint": results["checkpoint"], "step": results["step"],
                                    "train_bpb": results["train_bpb"], "val_bpb": results["val_bpb"],
                                    "samples": {f"{i}": s for i, s in enumerate(samples)}})
    return results


if __name__ == "__main__":
    main()
