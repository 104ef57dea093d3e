"""Inference: the KV cache and the Engine that samples through it, with stop tokens and the
calculator tool (`nanochat.calculator`).

    engine = Engine(model, tokenizer)
    for column, masks in engine.generate(prompt_ids, num_samples=4, max_tokens=64, temperature=0.8, seed=7):
        ...  # column: one token per sample; masks: 1 = sampled by the model, 0 = forced (tool output)
    for step in engine.steps(prompt_ids, max_tokens=64, top_logprobs=5):
        ...  # the same, plus step.logprobs: per sample, the token's log-probability and the top 5
    sequences, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=64)

How a call runs: the prompt is prefilled once at batch 1 (in chunks, so the (T, vocab) logits of
a long prompt never exist at once), its cache is copied to batch `num_samples`
(`KVCache.prefill`), then every step feeds one token per row through the cache. Each row ends at
its first <|assistant_end|> or <|bos|> (that token is yielded; later entries of the row are
padding: the stop token again, mask 0); the call ends when every row has ended or after
`max_tokens` tokens (forced tool tokens count).

Seeds: sample i draws from its own torch.Generator seeded `seed + i`, so sample i of a call equals
sample 0 of the same call with `seed + i` and one sample (a row never touches another row's
generator; rows also share no state through the batch beyond float rounding in batched matmuls).

The calculator tool is a per-row state machine: tokens between <|python_start|> and
<|python_end|> are collected; at <|python_end|> the expression goes to
`calculator.tool_output` and <|output_start|> output <|output_end|> is forced into that row. The
output is the result, or "error: ..." when the call fails (syntax, overflow, a non-finite result,
the time limit): a bad call is the model's problem to read, never an exception out of generate.

Log-probabilities (`top_logprobs` not None) are log_softmax of the raw logits (temperature 1,
before top-k/top-p), for every yielded token, forced ones included.

Speed (decode with the KV cache vs GPT.generate's full recompute, batch 1 vs 8):
`python -m bench.inference`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, NamedTuple

import torch

from nanochat.calculator import tool_output
from nanochat.sampling import check_sampling, sample_next_token

if TYPE_CHECKING:
    from nanochat.tokenizer import Tokenizer

# Prompt tokens per forward during prefill: bounds the (T, vocab) float32 logits the model returns
# (256 MiB per chunk at vocab 65,536) while keeping the matmuls large.
PREFILL_CHUNK = 1024
# why chat_cli/chat_web refuse --compile (RuntimeFlags.compile_refused)
NO_COMPILE = "KV-cache decoding changes the cache length every token, which a compiled graph would recompile for"
STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")
TOOL_TOKENS = ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")


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
        self.prev_embedding: torch.Tensor | None = None  # (B, 1, d): the last position's embedding (smear gate)

    @property
    def max_seq_len(self) -> int:
        return self.kv_shape[4]

    def reset(self) -> None:
        self.pos = 0
        self.prev_embedding = None

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
        if other.prev_embedding is not None:
            self.prev_embedding = other.prev_embedding.expand(mine[2], -1, -1).clone()
        if other.kv_cache is None:
            return
        if self.kv_cache is None or self.kv_cache.dtype != other.kv_cache.dtype or self.kv_cache.device != other.kv_cache.device:
            self.kv_cache = torch.empty(self.kv_shape, dtype=other.kv_cache.dtype, device=other.kv_cache.device)
        self.kv_cache[:, :, :, :, :other.pos] = other.kv_cache[:, :, :, :, :other.pos]


# ---------------------------------------------------------------------------------------------
# the engine

class TokenLogprobs(NamedTuple):
    """A yielded token's log-probability and the k most likely tokens at its position."""

    logprob: float
    top_ids: list[int]  # (k,), most likely first
    top_logprobs: list[float]  # (k,)


class Step(NamedTuple):
    """One position of a generation: a token and a mask per sample (see Engine.steps)."""

    tokens: list[int]
    masks: list[int]
    logprobs: list[TokenLogprobs] | None  # per sample; None unless top_logprobs was asked


def _logprobs(logits: torch.Tensor, column: list[int], k: int) -> list[TokenLogprobs]:
    """Per row of logits (N, V): log_softmax at column[row], and its top k."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    chosen = logprobs.gather(1, torch.tensor(column, device=logits.device).view(-1, 1))[:, 0].tolist()  # (N,)
    top_values, top_ids = logprobs.topk(k, dim=-1)  # (N, k)
    return [TokenLogprobs(lp, ids, values) for lp, ids, values in zip(chosen, top_ids.tolist(), top_values.tolist())]


@dataclass
class _Row:
    """Tool-use state of one sample."""

    forced: deque[int] = field(default_factory=deque)  # tokens to force before sampling again
    in_python: bool = False
    python_tokens: list[int] = field(default_factory=list)
    stop_token: int | None = None  # set when the row has ended


class Engine:
    """Sampling with a KV cache, stop tokens and the calculator tool (see the module docstring).

    tokenizer: gives the special-token ids and encodes tool results; None means plain decoding
    (no stop tokens, no tool), for benchmarks of raw models. The model runs in its own dtype:
    cast its weights (`model.to(torch.bfloat16)`) to decode in bf16. The model is only read, so
    several engines (threads) may share one model.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer | None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_len = model.rotary_seq_len  # positions the model accepts (its rotary table)
        self.stop_ids = frozenset(tokenizer.encode_special(name) for name in STOP_TOKENS) if tokenizer else frozenset()
        if tokenizer is not None:
            self.python_start, self.python_end, self.output_start, self.output_end = (
                tokenizer.encode_special(name) for name in TOOL_TOKENS)

    def _last_logits(self, ids: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        """Feed ids (B, T) after the cache's position; the logits (B, vocab) at the last one."""
        for start in range(0, ids.size(1), PREFILL_CHUNK):
            logits = self.model(ids[:, start:start + PREFILL_CHUNK], kv_cache=kv_cache)
        return logits[:, -1, :].float()

    def _check_request(self, tokens: list[int], num_samples: int, max_tokens: int) -> None:
        vocab_size = self.model.config.vocab_size
        if not tokens:
            raise ValueError("tokens: expected a non-empty prompt (start it with <|bos|>)")
        bad = next((t for t in tokens if not isinstance(t, int) or not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"tokens: expected ids in 0..{vocab_size - 1}, got {bad!r}")
        if num_samples < 1:
            raise ValueError(f"num_samples: expected >= 1, got {num_samples}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens: expected >= 1, got {max_tokens}")
        if len(tokens) + max_tokens > self.max_len:
            raise ValueError(f"max_tokens: the prompt ({len(tokens)} tokens) plus {max_tokens} new tokens exceed "
                             f"the model's {self.max_len} positions")

    @torch.inference_mode()
    def steps(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
              temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
              seed: int = 42, top_logprobs: int | None = None) -> Iterator[Step]:
        """One Step per position: a token per sample, mask 1 if sampled, 0 if forced (tool
        output, or padding after the row ended), and with top_logprobs=k (0..vocab) each token's
        log-probability and the k most likely alternatives. max_tokens None = until the model's
        last position."""
        max_tokens = self.max_len - len(tokens) if max_tokens is None else max_tokens
        self._check_request(tokens, num_samples, max_tokens)
        check_sampling(temperature, top_k, top_p)
        if top_logprobs is not None and not 0 <= top_logprobs <= self.model.config.vocab_size:
            raise ValueError(f"top_logprobs: expected 0..{self.model.config.vocab_size} (or None), got {top_logprobs}")
        cfg = self.model.config
        rngs = [torch.Generator(device=self.device).manual_seed(seed + i) for i in range(num_samples)]

        # Prefill once at batch 1; several samples copy its cache (sized for the whole reply).
        total_len = len(tokens) + max_tokens
        prompt_cache = KVCache(1, cfg.n_kv_head, len(tokens) if num_samples > 1 else total_len, cfg.head_dim, cfg.n_layer)
        logits = self._last_logits(torch.tensor([tokens], dtype=torch.long, device=self.device), prompt_cache)  # (1, V)
        kv_cache = prompt_cache
        if num_samples > 1:
            kv_cache = KVCache(num_samples, cfg.n_kv_head, total_len, cfg.head_dim, cfg.n_layer)
            kv_cache.prefill(prompt_cache)
            del prompt_cache
            logits = logits.expand(num_samples, -1)  # (N, V)

        rows = [_Row() for _ in range(num_samples)]
        for step in range(max_tokens):
            column, masks = [], []
            for i, row in enumerate(rows):
                if row.stop_token is not None:
                    token, mask = row.stop_token, 0
                elif row.forced:
                    token, mask = row.forced.popleft(), 0
                else:
                    token = int(sample_next_token(logits[i:i + 1], rngs[i], temperature, top_k, top_p).item())
                    mask = 1
                    if token in self.stop_ids:
                        row.stop_token = token
                    else:
                        self._advance_tool(row, token)
                column.append(token)
                masks.append(mask)
            yield Step(column, masks, None if top_logprobs is None else _logprobs(logits, column, top_logprobs))
            if step == max_tokens - 1 or all(row.stop_token is not None for row in rows):
                return
            ids = torch.tensor(column, dtype=torch.long, device=self.device).view(num_samples, 1)
            logits = self._last_logits(ids, kv_cache)

    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 42) -> Iterator[tuple[list[int], list[int]]]:
        """Per step, (tokens, masks) of `steps` (see there)."""
        steps = self.steps(tokens, num_samples, max_tokens, temperature, top_k, top_p, seed)
        try:
            for step in steps:
                yield step.tokens, step.masks
        finally:
            steps.close()

    def _advance_tool(self, row: _Row, token: int) -> None:
        """Track a sampled token through the tool-call state machine; queue the tool's output."""
        if self.tokenizer is None:
            return
        if token == self.python_start:
            row.in_python, row.python_tokens = True, []
        elif token == self.python_end and row.in_python:
            row.in_python = False
            output = tool_output(self.tokenizer.decode(row.python_tokens))
            row.forced.extend([self.output_start, *self.tokenizer.encode(output), self.output_end])
        elif row.in_python:
            row.python_tokens.append(token)

    def generate_batch(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                       temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                       seed: int = 42) -> tuple[list[list[int]], list[list[int]]]:
        """(sequences, masks), one per sample: the prompt then the completion up to, not
        including, its stop token. masks: 0 on the prompt and forced tokens, 1 on sampled ones."""
        sequences = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        ended = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples, max_tokens, temperature, top_k, top_p, seed):
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if ended[i]:
                    continue
                if token in self.stop_ids:
                    ended[i] = True
                    continue
                sequences[i].append(token)
                masks[i].append(mask)
        return sequences, masks
