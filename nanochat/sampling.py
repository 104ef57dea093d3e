"""Sampling the next token from logits: greedy, temperature, top-k and nucleus (top-p).

    next_ids = sample_next_token(logits, rng, temperature=0.8, top_k=50)   # (B, vocab) -> (B, 1)
    next_ids = sample_tokens(logits, uniforms, temperature=0.8, top_k=50)  # uniforms (B, 1) in [0, 1)

Inverse CDF with one uniform per row, for the whole batch in one op: a row's token depends only on
its own logits and its own uniform, so the caller decides where the uniforms come from (the Engine:
one CPU generator per sample, see nanochat.engine; GPT.generate, the slow full-recompute
reference: `rng`, through sample_next_token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CDF_BLOCK = 256  # entries per block of inverse_cdf's two-level search


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: expected >= 1 (or None), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected a value in (0, 1] (or None), got {top_p}")


def cdf_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the cumulative probabilities and the uniforms: float64 keeps tiny probabilities
    reachable (MPS has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def sample_next_token(logits: torch.Tensor, rng: torch.Generator | None, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Next token ids (B, 1) from logits (B, vocab), drawing the rows' uniforms from `rng` (on the
    logits' device, in cdf_dtype); nothing is drawn at temperature 0. See sample_tokens."""
    check_sampling(temperature, top_k, top_p)
    uniforms = None
    if temperature > 0.0:
        uniforms = torch.rand((logits.size(0), 1), generator=rng, dtype=cdf_dtype(logits.device), device=logits.device)
    return sample_tokens(logits, uniforms, temperature, top_k, top_p)


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor | None, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Next token ids (B, 1) from logits (B, vocab): argmax at temperature 0 (uniforms unused, may be
    None), else the inverse CDF at uniforms (B, 1) (values in [0, 1), any device and float dtype)
    of softmax(logits / temperature), restricted to the top_k logits when top_k is given, then to
    the nucleus (the most likely tokens whose probabilities first sum to >= top_p) when top_p < 1."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if uniforms is None or uniforms.shape != (logits.size(0), 1):
        raise ValueError(f"uniforms: expected shape ({logits.size(0)}, 1) at temperature {temperature}, "
                         f"got {None if uniforms is None else tuple(uniforms.shape)}")
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
    uniforms = uniforms.to(cdf_dtype(probs.device)).to(probs.device)  # the dtype first: MPS takes no float64
    choice = inverse_cdf(probs, uniforms)
    return choice if indices is None else indices.gather(1, choice)


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row of probs (B, n), the first index whose cumulative probability exceeds uniforms (B, 1)
    times the row's total: a draw from the row (torch.multinomial took ~2 ms over a 65,536-entry
    vocab on CPU; it also cannot take the uniforms from the caller).

    In two levels over blocks of CDF_BLOCK entries: the blocks' masses (one reduction), their
    cumulative sum (n / CDF_BLOCK entries), then the cumulative sum of the one chosen block. A
    float64 cumsum over all 65,536 entries took 5 ms at B = 8 on CPU, the block masses 1 ms. A
    token of zero probability is never chosen, whatever the rounding."""
    acc_dtype = uniforms.dtype
    rows, n = probs.shape
    if n < 2 * CDF_BLOCK:
        cdf = torch.cumsum(probs, dim=-1, dtype=acc_dtype)  # (B, n)
        return _search(cdf, uniforms * cdf[:, -1:])
    pad = -n % CDF_BLOCK
    blocks = (F.pad(probs, (0, pad)) if pad else probs).view(rows, -1, CDF_BLOCK)  # (B, nb, S)
    mass = blocks.sum(dim=-1, dtype=acc_dtype)  # (B, nb)
    block_cdf = torch.cumsum(mass, dim=-1)
    target = uniforms * block_cdf[:, -1:]  # (B, 1)
    block = _search(block_cdf, target)  # (B, 1)
    within = (target - (block_cdf.gather(1, block) - mass.gather(1, block))).clamp_(min=0)  # rounding: never < 0
    chosen = blocks.gather(1, block.unsqueeze(-1).expand(rows, 1, CDF_BLOCK)).squeeze(1)  # (B, S)
    return block * CDF_BLOCK + _search(torch.cumsum(chosen, dim=-1, dtype=acc_dtype), within)


def _search(cdf: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """First index with cdf > value per row; a value at or past the row's total (rounding) takes the
    last index of positive probability (where the cdf first reaches its total)."""
    return torch.minimum(torch.searchsorted(cdf, values, right=True), torch.searchsorted(cdf, cdf[:, -1:].contiguous()))
