"""Sampling the next token from logits: greedy, temperature, top-k and nucleus (top-p).

    next_ids = sample_next_token(logits, rng, temperature=0.8, top_k=50)   # (B, vocab) -> (B, 1)

Used by the Engine (KV-cache decoding) and by GPT.generate (the slow full-recompute reference).
"""

from __future__ import annotations

import torch


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: expected >= 1 (or None), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected a value in (0, 1] (or None), got {top_p}")


def sample_next_token(logits: torch.Tensor, rng: torch.Generator | None, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Next token ids (B, 1) from logits (B, vocab): argmax at temperature 0, else a sample from
    softmax(logits / temperature), restricted to the top_k logits when top_k is given, then to
    the nucleus (the most likely tokens whose probabilities first sum to >= top_p) when top_p < 1."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    indices = None  # (B, n) vocabulary ids of the columns of `values`, None = all, in order
    values = logits
    if top_k is not None and top_k < logits.size(-1):
        values, indices = torch.topk(logits, top_k, dim=-1)  # (B, k), sorted descending
    if top_p is not None and top_p < 1.0:
        if indices is None:
            values, indices = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(values / temperature, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # (B, n): mass of the more likely tokens
        values = values.masked_fill(mass_before >= top_p, float("-inf"))  # the first token always stays
    probs = torch.softmax(values / temperature, dim=-1)
    # Inverse CDF with one uniform per row: torch.multinomial took ~2 ms over a 65,536-entry vocab
    # on CPU, a cumsum + binary search takes ~0.1 ms. float64 keeps tiny probabilities reachable
    # (MPS has no float64).
    acc_dtype = torch.float32 if probs.device.type == "mps" else torch.float64
    cdf = torch.cumsum(probs, dim=-1, dtype=acc_dtype)  # (B, n)
    uniform = torch.rand((probs.size(0), 1), generator=rng, dtype=acc_dtype, device=probs.device)
    choice = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).clamp_(max=probs.size(-1) - 1)  # (B, 1)
    return choice if indices is None else indices.gather(1, choice)
