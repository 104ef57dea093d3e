"""Inference: the KV cache and next-token sampling (the Engine with tool use builds on these)."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for a batch of sequences, (n_layer, 2, B, n_kv_head, max_T, head_dim).

    The model calls `insert_kv` once per layer per forward; the position advances after the last
    layer, so all layers of one forward write the same positions. The storage is allocated on
    the first insert, with the device and dtype of the keys (bf16 under autocast).
    """

    def __init__(self, batch_size: int, num_heads: int, seq_len: int, head_dim: int, num_layers: int) -> None:
        for name, value in (("batch_size", batch_size), ("num_heads", num_heads), ("seq_len", seq_len),
                            ("head_dim", head_dim), ("num_layers", num_layers)):
            if value < 1:
                raise ValueError(f"KVCache {name}: expected a positive integer, got {value}")
        self.kv_shape = (num_layers, 2, batch_size, num_heads, seq_len, head_dim)
        self.kv_cache: torch.Tensor | None = None
        self.pos = 0

    @property
    def max_seq_len(self) -> int:
        return self.kv_shape[4]

    def reset(self) -> None:
        self.pos = 0

    def get_pos(self) -> int:
        return self.pos

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_head, T_new, head_dim) after the current position; return this
        layer's keys and values for positions 0 .. pos + T_new, each (B, n_kv_head, pos + T_new, head_dim)."""
        num_layers, _, batch_size, num_heads, max_len, head_dim = self.kv_shape
        if k.shape[:2] != (batch_size, num_heads) or k.size(3) != head_dim or v.shape != k.shape:
            raise ValueError(f"KVCache.insert_kv: expected k and v of shape ({batch_size}, {num_heads}, T, {head_dim}), "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        end = self.pos + k.size(2)
        if end > max_len:
            raise ValueError(f"KVCache.insert_kv: {end} positions do not fit the cache's seq_len={max_len}")
        if self.kv_cache is None:
            self.kv_cache = torch.empty(self.kv_shape, dtype=k.dtype, device=k.device)
        self.kv_cache[layer_idx, 0, :, :, self.pos:end] = k
        self.kv_cache[layer_idx, 1, :, :, self.pos:end] = v
        keys = self.kv_cache[layer_idx, 0, :, :, :end]
        values = self.kv_cache[layer_idx, 1, :, :, :end]
        if layer_idx == num_layers - 1:
            self.pos = end
        return keys, values

    def prefill(self, other: KVCache) -> None:
        """Copy `other` (batch 1, or this cache's batch size) into this cache, broadcasting over the
        batch: one prompt's prefill shared by B samples. This cache continues from other's position."""
        mine, theirs = self.kv_shape, other.kv_shape
        if (theirs[0], theirs[1], theirs[3], theirs[5]) != (mine[0], mine[1], mine[3], mine[5]) or theirs[2] not in (1, mine[2]):
            raise ValueError(f"KVCache.prefill: cannot copy a cache of shape {theirs} into one of shape {mine} "
                             f"(layers, heads and head_dim must match; batch must be 1 or {mine[2]})")
        if other.pos > self.max_seq_len:
            raise ValueError(f"KVCache.prefill: {other.pos} positions do not fit the cache's seq_len={self.max_seq_len}")
        self.pos = other.pos
        if other.kv_cache is None:
            return
        if self.kv_cache is None or self.kv_cache.dtype != other.kv_cache.dtype or self.kv_cache.device != other.kv_cache.device:
            self.kv_cache = torch.empty(self.kv_shape, dtype=other.kv_cache.dtype, device=other.kv_cache.device)
        self.kv_cache[:, :, :, :, :other.pos] = other.kv_cache[:, :, :, :, :other.pos]


def sample_next_token(logits: torch.Tensor, rng: torch.Generator | None, temperature: float = 1.0,
                      top_k: int | None = None) -> torch.Tensor:
    """Next token ids (B, 1) from logits (B, vocab): argmax at temperature 0, else a sample from
    softmax(logits / temperature), restricted to the top_k logits when top_k is given."""
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: expected >= 1 (or None), got {top_k}")
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if top_k is not None and top_k < logits.size(-1):
        values, indices = torch.topk(logits, top_k, dim=-1)  # (B, k)
        probs = torch.softmax(values / temperature, dim=-1)
        return indices.gather(1, torch.multinomial(probs, num_samples=1, generator=rng))
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng)
