"""What a run would compute on, in two lines, before anything long starts (run10.sh's first step):

    python -m scripts.device_check --device=cuda
    device: cuda:0 NVIDIA GeForce RTX 5090, compute capability 12.0, 31.4 GiB; CUDA 13.0, torch 2.13.0, compute bfloat16
    training attention: FLASH_ATTENTION for 6 heads x 128 x 8192 tokens

A machine where torch finds no GPU stops here with the reason (--device=cuda's check), and a dtype x
head size that no allowed attention kernel takes stops with what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nanochat.common import RunContext, device_summary, print0, run_main
from nanochat.config import RuntimeFlags, UserError, parse_args
from nanochat.gpt import training_attention_backend


@dataclass
class DeviceCheckFlags(RuntimeFlags):
    """The runtime flags, and the attention shape to check (run10.sh's d12 by default)."""

    head_dim: int = field(default=128, metadata={"help": "attention head size to check (d12: 128)"})
    n_head: int = field(default=6, metadata={"help": "attention heads to check"})
    seq_len: int = field(default=8192, metadata={"help": "sequence length to check"})


def describe_device(cfg: DeviceCheckFlags, ctx: RunContext) -> str:
    """Prints device_summary and the SDPA kernel training attention picks for the shape; returns the
    kernel's name. On CUDA a shape that no allowed kernel takes is an error: training would stop at
    its first step."""
    kernel = training_attention_backend(ctx.device, ctx.dtype, cfg.n_head, cfg.head_dim, cfg.seq_len)
    print0(device_summary(ctx))
    print0(f"training attention: {kernel} for {cfg.n_head} heads x {cfg.head_dim} x {cfg.seq_len} tokens")
    if kernel == "none":
        raise UserError(f"no flash/memory-efficient attention kernel takes {ctx.dtype} x head_dim {cfg.head_dim} "
                        f"on this GPU: try --dtype=float32")
    return kernel


def main(argv: list[str] | None = None) -> str:
    return run_main(describe_device, parse_args(DeviceCheckFlags, argv, prog="python -m scripts.device_check"))


if __name__ == "__main__":
    main()
