"""Inference: the KV cache and the Engine that samples through it, with stop tokens and the
calculator tool (`nanochat.calculator`).

    engine = Engine(model, tokenizer)
    for column, masks in engine.generate(prompt_ids, num_samples=4, max_tokens=64, temperature=0.8, seed=7):
        ...  # column: one token per sample; masks: 1 = sampled by the model, 0 = forced (tool output)
    for step in engine.steps(prompt_ids, max_tokens=64, top_logprobs=5):
        ...  # the same, plus step.logprobs: per sample, the token's log-probability and the top 5
    sequences, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=64)
    for p, sequences, masks in engine.generate_many(prompts, num_samples=2, max_tokens=64, seeds=seeds):
        ...  # prompt p's samples, as generate_batch(prompts[p], 2, 64, seed=seeds[p]) gives them

How a call runs: every sample of every prompt is a row; up to `batch_size` rows decode together
in one KV cache of (n_layer, 2, batch_size, n_kv_head, longest prompt + max_tokens, head_dim). A
prompt is prefilled once at batch 1 (in chunks, so the (T, vocab) logits of a long prompt never
exist at once) and its cache copied into one row per sample (`KVCache.append_row`). Each step
then samples a token for every row in one op with one host sync, and feeds the tokens through the
cache. Rows keep their own positions (rotary and an attention mask per row), so prompts of any
lengths share a batch; while all rows are at one position (the samples of one prompt) the model
takes its plain path. A row ends at its first <|assistant_end|> or <|bos|> (that token is
yielded) or after its `max_tokens` tokens (forced tool tokens count); an ended row leaves the
batch (`KVCache.keep_rows`) and the next waiting row takes its place. In `steps`/`generate`, a
row that has ended is padding: its stop token again, mask 0, log-probabilities None.

Seeds: sample i of a prompt with seed s draws from its own CPU torch.Generator seeded s + i, one
float64 uniform per sampled token (none for forced tokens, none at temperature 0); the batch's
uniforms go to the device as one tensor and `sampling.sample_tokens` turns each row's uniform
into its token by inverse CDF. So sample i of a call equals sample 0 of the same call with seed
s + i, a prompt in `generate_many` decodes as it would alone, the draws are the same on every
device, and on CPU they equal GPT.generate's with the same seed (rows share nothing through the
batch beyond float rounding in batched matmuls).

The calculator tool is a per-row state machine: tokens between <|python_start|> and
<|python_end|> are collected; at <|python_end|> the expression goes to
`calculator.tool_output` and <|output_start|> output <|output_end|> is forced into that row. The
output is the result, or "error: ..." when the call fails (syntax, overflow, a non-finite result,
the time limit): a bad call is the model's problem to read, never an exception out of generate.

Log-probabilities (`top_logprobs` not None) are log_softmax of the raw logits (temperature 1,
before top-k/top-p), for every yielded token, forced ones included.

Speed (decode with the KV cache vs GPT.generate's full recompute, batch 1 vs 8; and this engine
against an earlier git revision): `python -m bench.inference`, see its docstring.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, NamedTuple

import torch

from nanochat.calculator import tool_output
from nanochat.sampling import check_sampling, sample_tokens

if TYPE_CHECKING:
    from nanochat.tokenizer import Tokenizer

# Prompt tokens per forward during prefill: bounds the (T, vocab) float32 logits the model returns
# (256 MiB per chunk at vocab 65,536) while keeping the matmuls large.
PREFILL_CHUNK = 1024
# Rows (samples) decoded together by generate_many unless told otherwise: the default of the
# scripts' --decode_batch_size. Its KV cache: batch x (prompt + new tokens) positions, e.g. about
# 4 GiB at d20 in bf16 for 32 rows of 1,280 positions.
DECODE_BATCH_SIZE = 32
# why chat_cli/chat_web refuse --compile (RuntimeFlags.compile_refused)
NO_COMPILE = "KV-cache decoding changes the cache length every token, which a compiled graph would recompile for"
STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")
TOOL_TOKENS = ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")


class KVCache:
    """Keys and values of every layer for up to B rows, (n_layer, 2, B, n_kv_head, max_T, head_dim).

    Each row has its own position (`lengths`, on the host; `row_pos` on the device while they
    differ). The model calls `insert_kv` once per layer per forward, which writes the new tokens
    after each row's position; positions advance after the last layer, so all layers of one
    forward write the same positions. While every row is at one position this is plain slicing
    and `attn_mask` is None; otherwise the writes are scattered per row and `attn_mask` (made at
    layer 0, for every layer of the forward) says which cached positions each new token sees.
    Rows come and go for decoding many prompts (`append_row`, `keep_rows`). The storage is
    allocated at the first write, zeroed (a masked-out entry must be finite: 0 x NaN is NaN),
    with the device and dtype of the keys (bf16 under autocast).
    """

    def __init__(self, batch_size: int, num_heads: int, seq_len: int, head_dim: int, num_layers: int,
                 rows: int | None = None) -> None:
        """rows: rows in use at the start, all at position 0 (None = batch_size; 0 for a cache that
        `append_row` fills)."""
        for name, value in (("batch_size", batch_size), ("num_heads", num_heads), ("seq_len", seq_len),
                            ("head_dim", head_dim), ("num_layers", num_layers)):
            if value < 1:
                raise ValueError(f"KVCache {name}: expected a positive integer, got {value}")
        rows = batch_size if rows is None else rows
        if not 0 <= rows <= batch_size:
            raise ValueError(f"KVCache rows: expected 0..{batch_size} (the batch size), got {rows}")
        self.kv_shape = (num_layers, 2, batch_size, num_heads, seq_len, head_dim)
        self.kv_cache: torch.Tensor | None = None
        self.lengths = [0] * rows  # (rows,) positions filled per row
        self.row_pos: torch.Tensor | None = None  # (rows,) long on the cache's device; None while all lengths agree
        self.attn_mask: torch.Tensor | None = None  # (rows, 1, T, end) bool for the current forward; None = plain causal
        self.prev_embedding: torch.Tensor | None = None  # (rows, 1, d): the last position's embedding (smear gate)

    @property
    def max_seq_len(self) -> int:
        return self.kv_shape[4]

    def reset(self) -> None:
        self.lengths = [0] * len(self.lengths)
        self.row_pos = self.attn_mask = self.prev_embedding = None

    def get_pos(self) -> int:
        """The furthest row's position (every row's, while they agree)."""
        return max(self.lengths, default=0)

    def positions(self, num_new: int) -> torch.Tensor | None:
        """(rows, num_new) positions of the next num_new tokens of each row; None while every row is
        at get_pos()."""
        if self.row_pos is None:
            return None
        return self.row_pos.unsqueeze(1) + torch.arange(num_new, device=self.row_pos.device)

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (rows, n_kv_head, T_new, head_dim) after each row's position; return this
        layer's keys and values for positions 0 .. get_pos() + T_new, each (rows, n_kv_head,
        get_pos() + T_new, head_dim) (a row's entries past its own position are masked by attn_mask)."""
        num_layers, _, _, num_heads, max_len, head_dim = self.kv_shape
        rows, num_new = len(self.lengths), k.size(2)
        if k.shape[:2] != (rows, num_heads) or k.size(3) != head_dim or v.shape != k.shape:
            raise ValueError(f"KVCache.insert_kv: expected k and v of shape ({rows}, {num_heads}, T, {head_dim}), "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        end = self.get_pos() + num_new
        if end > max_len:
            raise ValueError(f"KVCache.insert_kv: {end} positions do not fit the cache's seq_len={max_len}")
        if self.kv_cache is None:
            self.kv_cache = torch.zeros(self.kv_shape, dtype=k.dtype, device=k.device)
        layer = self.kv_cache[layer_idx]  # (2, B, H, max_T, D)
        positions = self.positions(num_new)  # (rows, T) or None
        if positions is None:
            layer[0, :rows, :, end - num_new:end] = k
            layer[1, :rows, :, end - num_new:end] = v
        else:
            row = torch.arange(rows, device=k.device).unsqueeze(1)  # (rows, 1)
            layer[0][row, :, positions] = k.transpose(1, 2)  # (rows, T, H, D) at (row, position)
            layer[1][row, :, positions] = v.transpose(1, 2)
        if layer_idx == 0:
            self.attn_mask = None if positions is None else (
                torch.arange(end, device=k.device) <= positions.unsqueeze(-1)).unsqueeze(1)  # (rows, 1, T, end)
        if layer_idx == num_layers - 1:
            self.lengths = [length + num_new for length in self.lengths]
            if self.row_pos is not None:
                self.row_pos += num_new
        return layer[0, :rows, :, :end], layer[1, :rows, :, :end]

    def prefill(self, other: KVCache) -> None:
        """Copy `other` (batch 1, or this cache's batch size) into every row of this cache,
        broadcasting over the batch: one prompt's prefill shared by B samples. Every row
        continues from other's position."""
        mine, theirs = self.kv_shape, other.kv_shape
        if (theirs[0], theirs[1], theirs[3], theirs[5]) != (mine[0], mine[1], mine[3], mine[5]) or theirs[2] not in (1, mine[2]):
            raise ValueError(f"KVCache.prefill: cannot copy a cache of shape {theirs} into one of shape {mine} "
                             f"(layers, heads and head_dim must match; batch must be 1 or {mine[2]})")
        pos = other.get_pos()
        if pos > self.max_seq_len:
            raise ValueError(f"KVCache.prefill: {pos} positions do not fit the cache's seq_len={self.max_seq_len}")
        if len(set(other.lengths)) > 1:
            raise ValueError(f"KVCache.prefill: the source's rows are at different positions {other.lengths}")
        self.lengths, self.row_pos = [pos] * mine[2], None
        if other.prev_embedding is not None:
            self.prev_embedding = other.prev_embedding.expand(mine[2], -1, -1).clone()
        if other.kv_cache is None:
            return
        if self.kv_cache is None or self.kv_cache.dtype != other.kv_cache.dtype or self.kv_cache.device != other.kv_cache.device:
            self.kv_cache = torch.zeros(self.kv_shape, dtype=other.kv_cache.dtype, device=other.kv_cache.device)
        self.kv_cache[:, :, :, :, :pos] = other.kv_cache[:, :, :, :, :pos]

    def append_row(self, other: KVCache) -> None:
        """Copy `other` (batch 1, filled) into a new last row, which continues from other's position."""
        mine, theirs = self.kv_shape, other.kv_shape
        same_layout = (theirs[0], theirs[1], theirs[3], theirs[5]) == (mine[0], mine[1], mine[3], mine[5])
        if not same_layout or theirs[2] != 1 or other.kv_cache is None:
            raise ValueError(f"KVCache.append_row: expected a filled batch-1 cache of shape "
                             f"{(mine[0], mine[1], 1, mine[3], '*', mine[5])}, got {theirs}"
                             f"{'' if other.kv_cache is not None else ' (empty)'}")
        row, pos = len(self.lengths), other.get_pos()
        if row == mine[2]:
            raise ValueError(f"KVCache.append_row: all {mine[2]} rows are in use")
        if pos > self.max_seq_len:
            raise ValueError(f"KVCache.append_row: {pos} positions do not fit the cache's seq_len={self.max_seq_len}")
        if self.kv_cache is None:
            self.kv_cache = torch.zeros(self.kv_shape, dtype=other.kv_cache.dtype, device=other.kv_cache.device)
        self.kv_cache[:, :, row, :, :pos] = other.kv_cache[:, :, 0, :, :pos]
        if other.prev_embedding is not None:
            self.prev_embedding = (other.prev_embedding if self.prev_embedding is None
                                   else torch.cat((self.prev_embedding, other.prev_embedding)))
        self.lengths.append(pos)
        self._positions_changed()

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only `rows` (increasing indices into the rows in use), moved to the front in order."""
        if rows != sorted(set(rows)) or any(not 0 <= i < len(self.lengths) for i in rows):
            raise ValueError(f"KVCache.keep_rows: expected increasing row indices in 0..{len(self.lengths) - 1}, got {rows}")
        if rows != list(range(len(rows))) and self.kv_cache is not None:
            index = torch.tensor(rows, dtype=torch.long, device=self.kv_cache.device)
            end = self.get_pos()
            self.kv_cache[:, :, :len(rows), :, :end] = self.kv_cache[:, :, index, :, :end]  # the right side is a copy
            if self.prev_embedding is not None:
                self.prev_embedding = self.prev_embedding[index]
        elif self.prev_embedding is not None:
            self.prev_embedding = self.prev_embedding[:len(rows)]
        self.lengths = [self.lengths[i] for i in rows]
        self._positions_changed()

    def _positions_changed(self) -> None:
        same = len(set(self.lengths)) <= 1
        self.row_pos = None if same else torch.tensor(self.lengths, dtype=torch.long, device=self.kv_cache.device)


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
    logprobs: list[TokenLogprobs | None] | None  # per sample (None once it has ended); None unless top_logprobs was asked


def _logprobs(logits: torch.Tensor, column: list[int], k: int) -> list[TokenLogprobs]:
    """Per row of logits (N, V): log_softmax at column[row], and its top k."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    chosen = logprobs.gather(1, torch.tensor(column, device=logits.device).view(-1, 1))[:, 0].tolist()  # (N,)
    top_values, top_ids = logprobs.topk(k, dim=-1)  # (N, k)
    return [TokenLogprobs(lp, ids, values) for lp, ids, values in zip(chosen, top_ids.tolist(), top_values.tolist())]


@dataclass
class _Row:
    """One sample being decoded: its prompt, its RNG, what it yielded, its tool-use state."""

    prompt: int  # index into the call's prompts
    sample: int  # 0 .. num_samples - 1
    limit: int  # tokens it may yield (forced ones count)
    rng: torch.Generator | None  # on the CPU, seeded seed + sample; None at temperature 0
    tokens: list[int] = field(default_factory=list)  # yielded so far, the stop token included
    masks: list[int] = field(default_factory=list)  # 1 sampled, 0 forced
    forced: deque[int] = field(default_factory=deque)  # tokens to force before sampling again
    in_python: bool = False
    python_tokens: list[int] = field(default_factory=list)
    stop_token: int | None = None  # set when the row has sampled a stop token

    @property
    def ended(self) -> bool:
        return self.stop_token is not None or len(self.tokens) == self.limit


class Engine:
    """Sampling with a KV cache, stop tokens and the calculator tool (see the module docstring).

    tokenizer: gives the special-token ids and encodes tool results; None means plain decoding
    (no stop tokens, no tool), for benchmarks of raw models. The model computes in its weights'
    dtype on CUDA (`model.to(torch.bfloat16)` decodes in bf16) and at least in fp32 on a CPU (bf16
    weights there save memory, not time; autocast makes the matmuls bf16). The model is only read,
    so several engines (threads) may share one model.
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
        """Feed ids (B, T) after the cache's positions; the logits (B, vocab) at the last one."""
        for start in range(0, ids.size(1), PREFILL_CHUNK):
            logits = self.model(ids[:, start:start + PREFILL_CHUNK], kv_cache=kv_cache)
        return logits[:, -1, :].float()

    def _check_prompt(self, tokens: list[int], name: str) -> None:
        vocab_size = self.model.config.vocab_size
        if not tokens:
            raise ValueError(f"{name}: expected a non-empty prompt (start it with <|bos|>)")
        bad = next((t for t in tokens if not isinstance(t, int) or not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"{name}: expected ids in 0..{vocab_size - 1}, got {bad!r}")
        if len(tokens) >= self.max_len:
            raise ValueError(f"{name}: the prompt ({len(tokens)} tokens) leaves no room in the model's {self.max_len} positions")

    def _check_request(self, tokens: list[int], num_samples: int, max_tokens: int) -> None:
        self._check_prompt(tokens, "tokens")
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
        log-probability and the k most likely alternatives (None for padding). max_tokens None =
        until the model's last position."""
        max_tokens = self.max_len - len(tokens) if max_tokens is None else max_tokens
        self._check_request(tokens, num_samples, max_tokens)
        check_sampling(temperature, top_k, top_p)
        if top_logprobs is not None and not 0 <= top_logprobs <= self.model.config.vocab_size:
            raise ValueError(f"top_logprobs: expected 0..{self.model.config.vocab_size} (or None), got {top_logprobs}")
        column = [0] * num_samples
        for rows, row_logprobs in self._decode([tokens], num_samples, [max_tokens], [seed], num_samples,
                                               temperature, top_k, top_p, top_logprobs):
            masks, logprobs = [0] * num_samples, [None] * num_samples  # an ended row keeps its stop token, mask 0
            for i, row in enumerate(rows):
                column[row.sample], masks[row.sample] = row.tokens[-1], row.masks[-1]
                if row_logprobs is not None:
                    logprobs[row.sample] = row_logprobs[i]
            yield Step(list(column), masks, None if top_logprobs is None else logprobs)

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

    def generate_batch(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                       temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                       seed: int = 42) -> tuple[list[list[int]], list[list[int]]]:
        """(sequences, masks), one per sample: the prompt then the completion up to, not
        including, its stop token. masks: 0 on the prompt and forced tokens, 1 on sampled ones."""
        max_tokens = self.max_len - len(tokens) if max_tokens is None else max_tokens
        self._check_request(tokens, num_samples, max_tokens)
        _, sequences, masks = next(self.generate_many([tokens], num_samples, max_tokens, temperature, top_k, top_p,
                                                      [seed], batch_size=num_samples))
        return sequences, masks

    @torch.inference_mode()
    def generate_many(self, prompts: list[list[int]], num_samples: int = 1, max_tokens: int | None = None,
                      temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                      seeds: list[int] | None = None, batch_size: int = DECODE_BATCH_SIZE
                      ) -> Iterator[tuple[int, list[list[int]], list[list[int]]]]:
        """Decode num_samples samples of every prompt, batch_size rows at a time; yield (p,
        sequences, masks) for prompt p as soon as all its samples have ended, in that order, with
        sequences and masks as generate_batch(prompts[p], num_samples, ..., seed=seeds[p]) gives
        them. Each prompt gets at most max_tokens new tokens, fewer where the model's positions
        run out (None = up to the last position). seeds: one per prompt (None = 42 for each)."""
        seeds = [42] * len(prompts) if seeds is None else seeds
        if not prompts:
            raise ValueError("prompts: expected at least one prompt")
        for p, tokens in enumerate(prompts):
            self._check_prompt(tokens, f"prompts[{p}]")
        if num_samples < 1:
            raise ValueError(f"num_samples: expected >= 1, got {num_samples}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens: expected >= 1 (or None), got {max_tokens}")
        if len(seeds) != len(prompts):
            raise ValueError(f"seeds: expected one per prompt ({len(prompts)}), got {len(seeds)}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        check_sampling(temperature, top_k, top_p)
        limits = [self.max_len - len(tokens) if max_tokens is None else min(max_tokens, self.max_len - len(tokens))
                  for tokens in prompts]
        ended: dict[int, list[_Row]] = {}
        for rows, _ in self._decode(prompts, num_samples, limits, seeds, batch_size, temperature, top_k, top_p, None):
            for row in rows:
                if row.ended:
                    ended.setdefault(row.prompt, []).append(row)
                    if len(ended[row.prompt]) == num_samples:
                        done = sorted(ended.pop(row.prompt), key=lambda r: r.sample)
                        prompt = prompts[row.prompt]
                        replies = [r.tokens[:-1] if r.stop_token is not None else r.tokens for r in done]
                        yield (row.prompt, [prompt + reply for reply in replies],
                               [[0] * len(prompt) + r.masks[:len(reply)] for r, reply in zip(done, replies)])

    def _decode(self, prompts: list[list[int]], num_samples: int, limits: list[int], seeds: list[int], batch_size: int,
                temperature: float, top_k: int | None, top_p: float | None,
                top_logprobs: int | None) -> Iterator[tuple[list[_Row], list[TokenLogprobs] | None]]:
        """The decode loop of every call. Per step, the rows in the batch, each with its new token
        (row.tokens[-1], row.masks[-1]; rows that end at this step included), and with
        top_logprobs their log-probabilities. Rows are admitted in prompt order."""
        cfg = self.model.config
        waiting = deque(_Row(p, i, limits[p], None if temperature == 0 else torch.Generator().manual_seed(seeds[p] + i))
                        for p in range(len(prompts)) for i in range(num_samples))
        seq_len = max(len(tokens) + limit for tokens, limit in zip(prompts, limits))
        cache = KVCache(min(batch_size, len(waiting)), cfg.n_kv_head, seq_len, cfg.head_dim, cfg.n_layer, rows=0)
        rows: list[_Row] = []
        logits: list[torch.Tensor] = []  # next-token logits of the rows, (rows, V) in pieces
        prefilled: tuple[int, KVCache | None, torch.Tensor | None] = (-1, None, None)  # (prompt, its cache, its logits)
        while True:
            while waiting and len(rows) < cache.kv_shape[2]:
                row = waiting.popleft()
                if prefilled[0] != row.prompt:  # the samples of a prompt are admitted one after another
                    prompt_cache = KVCache(1, cfg.n_kv_head, len(prompts[row.prompt]), cfg.head_dim, cfg.n_layer)
                    prompt_ids = torch.tensor([prompts[row.prompt]], dtype=torch.long, device=self.device)
                    prefilled = (row.prompt, prompt_cache, self._last_logits(prompt_ids, prompt_cache))  # (1, V)
                cache.append_row(prefilled[1])
                logits.append(prefilled[2])
                rows.append(row)
            step_logits = torch.cat(logits) if len(logits) > 1 else logits[0]  # (rows, V)
            self._next_tokens(rows, step_logits, temperature, top_k, top_p)
            yield rows, None if top_logprobs is None else _logprobs(step_logits, [row.tokens[-1] for row in rows], top_logprobs)
            keep = [i for i, row in enumerate(rows) if not row.ended]
            if len(keep) < len(rows):
                cache.keep_rows(keep)
                rows = [rows[i] for i in keep]
            if not rows and not waiting:
                return
            logits = []
            if rows:
                ids = torch.tensor([[row.tokens[-1]] for row in rows], dtype=torch.long, device=self.device)  # (rows, 1)
                logits.append(self._last_logits(ids, cache))

    def _next_tokens(self, rows: list[_Row], logits: torch.Tensor, temperature: float, top_k: int | None,
                     top_p: float | None) -> None:
        """Append every row's next token: forced (tool output) or sampled from its logits (rows, V),
        all rows in one op and one host sync; then the stop and tool bookkeeping."""
        sampling = [not row.forced for row in rows]
        sampled: list[int] = []
        if any(sampling):
            uniforms = None
            if temperature > 0:  # a row's generator advances only when the row samples
                uniforms = torch.tensor([[torch.rand(1, generator=row.rng, dtype=torch.float64).item() if s else 0.0]
                                         for row, s in zip(rows, sampling)], dtype=torch.float64)  # (rows, 1)
            sampled = sample_tokens(logits, uniforms, temperature, top_k, top_p).view(-1).tolist()  # the one sync
        for i, row in enumerate(rows):
            if not sampling[i]:
                row.tokens.append(row.forced.popleft())
                row.masks.append(0)
                continue
            token = sampled[i]
            row.tokens.append(token)
            row.masks.append(1)
            if token in self.stop_ids:
                row.stop_token = token
            else:
                self._advance_tool(row, token)

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
