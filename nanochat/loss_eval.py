"""Bits per byte: a tokenizer-independent loss, used by base_train and base_loss."""

from __future__ import annotations

import math
from typing import Iterator

import torch

from nanochat import distributed
from nanochat.common import RunContext


@torch.no_grad()
def evaluate_bpb(
    model: torch.nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    token_bytes: torch.Tensor,
    ctx: RunContext,
) -> float:
    """Sum of per-token losses (nats) over `steps` batches / (ln 2 * bytes those tokens decode to).

    Special tokens (0 bytes) and ignored targets (-1) count neither loss nor bytes. Under DDP the
    sums are all-reduced so every rank returns the same value.
    """
    was_training = model.training
    model.eval()
    total_nats = torch.zeros((), dtype=torch.float64, device=ctx.device)
    total_bytes = torch.zeros((), dtype=torch.float64, device=ctx.device)
    token_bytes = token_bytes.to(ctx.device)
    for _, (inputs, targets) in zip(range(steps), batches):
        with ctx.autocast():
            loss = model(inputs, targets, loss_reduction="none").view(-1).double()  # (B*T,)
        flat = targets.view(-1)
        valid = flat >= 0
        nbytes = torch.where(valid, token_bytes[flat.clamp(min=0)], 0).double()
        total_nats += (loss * (nbytes > 0)).sum()
        total_bytes += nbytes.sum()
    if ctx.ddp:
        distributed.wait_all([distributed.all_reduce(total_nats, "val bpb"), distributed.all_reduce(total_bytes, "val bpb")])
    model.train(was_training)
    if total_bytes.item() == 0:
        raise ValueError("evaluate_bpb: the evaluated tokens decode to 0 bytes (no batches, or only special tokens)")
    return float(total_nats / (math.log(2) * total_bytes))
