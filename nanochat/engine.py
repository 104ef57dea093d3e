"""Inference: the KV cache, sampling, the calculator tool and the Engine that ties them together.

    engine = Engine(model, tokenizer)
    for column, masks in engine.generate(prompt_ids, num_samples=4, max_tokens=64, temperature=0.8, seed=7):
        ...  # column: one token per sample; masks: 1 = sampled by the model, 0 = forced (tool output)
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
<|python_end|> are collected; at <|python_end|> the expression is evaluated by `use_calculator`
and <|output_start|> result <|output_end|> is forced into that row. `use_calculator` is a
restricted AST evaluator, not the sandbox (`nanochat.execution`): it runs in-process in ~15 us
where the sandbox starts an interpreter per call (~150 ms measured on the 2-core CPU machines,
paid once per tool call per row during RL rollouts), and it is safe by construction (it walks a
whitelist of nodes and bounds every intermediate value) rather than by containment.

Speed (decode with the KV cache vs GPT.generate's full recompute, batch 1 vs 8):
`python -m bench.inference`.
"""

from __future__ import annotations

import ast
import codecs
import math
import operator
import re
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

if TYPE_CHECKING:
    from nanochat.tokenizer import Tokenizer

# Prompt tokens per forward during prefill: bounds the (T, vocab) float32 logits the model returns
# (256 MiB per chunk at vocab 65,536) while keeping the matmuls large.
PREFILL_CHUNK = 1024
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


# ---------------------------------------------------------------------------------------------
# sampling

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


# ---------------------------------------------------------------------------------------------
# the calculator tool

class CalculatorError(ValueError):
    """An expression the calculator refuses or cannot evaluate."""


CALCULATOR_MAX_CHARS = 256
CALCULATOR_MAX_STR = 1000  # longest string any step may produce
CALCULATOR_MAX_INT = 10**100  # largest integer magnitude any step may produce
CALCULATOR_MAX_EXPONENT = 256
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_BINARY_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY_OPS: dict[type, Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _round(number: Any, ndigits: int = 0) -> Any:
    if not isinstance(ndigits, int) or abs(ndigits) > 15:  # round(x, -10**100) would compute 10**(10**100)
        raise CalculatorError(f"round: ndigits must be an integer in [-15, 15], got {ndigits!r}")
    return round(number, ndigits)


_FUNCTIONS: dict[str, Callable[..., Any]] = {"len": len, "abs": abs, "round": _round, "min": min, "max": max}
_STR_METHODS = frozenset({"count", "find", "index", "upper", "lower", "strip", "lstrip", "rstrip",
                          "startswith", "endswith", "replace", "title", "capitalize"})


def use_calculator(expression: str) -> str | None:
    """The result of a tool call as the text forced after <|output_start|>, or None when the
    expression is not allowed or fails (then nothing is forced, as nanochat).

    Allowed: int/float/str literals, + - * / // % ** and unary -, len abs round min max, and
    the string methods count find index upper lower strip lstrip rstrip startswith endswith
    replace title capitalize, indexing and slicing of strings: "48/2", "'strawberry'.count('r')".
    In an expression without quotes, a comma between a digit and exactly three more digits is a
    thousands separator ("1,000*3"). Integral floats print as integers (GSM8K writes 48/2 = 24);
    other floats are rounded to 6 decimals.
    """
    expression = expression.strip()
    if "'" not in expression and '"' not in expression:
        expression = _THOUSANDS_COMMA.sub("", expression)
    try:
        if not expression or len(expression) > CALCULATOR_MAX_CHARS:
            raise CalculatorError(f"expected 1..{CALCULATOR_MAX_CHARS} characters, got {len(expression)}")
        value = _evaluate(ast.parse(expression, mode="eval").body)
    except (SyntaxError, CalculatorError, ArithmeticError, ValueError, TypeError, IndexError):
        return None
    return _format_result(value)


def _format_result(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CalculatorError(f"non-finite result {value}")
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(round(value, 6))
    return str(value)


def _checked(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and abs(value) > CALCULATOR_MAX_INT:
        raise CalculatorError("integer too large")
    if isinstance(value, str) and len(value) > CALCULATOR_MAX_STR:
        raise CalculatorError("string too long")
    if not isinstance(value, (int, float, str)):
        raise CalculatorError(f"unsupported result type {type(value).__name__}")
    return value


def _evaluate(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        operand = _evaluate(node.operand)
        if isinstance(operand, str):
            raise CalculatorError("unary operator on a string")
        return _checked(_UNARY_OPS[type(node.op)](operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        op = type(node.op)
        if isinstance(left, str) or isinstance(right, str):
            allowed = (op is ast.Add and isinstance(left, str) and isinstance(right, str)) or (
                op is ast.Mult and isinstance(left, str) != isinstance(right, str))
            if not allowed:  # str % args would be formatting, str * str an error
                raise CalculatorError("unsupported string operation")
            if op is ast.Mult:
                text, times = (left, right) if isinstance(left, str) else (right, left)
                if not isinstance(times, int) or len(text) * max(times, 0) > CALCULATOR_MAX_STR:
                    raise CalculatorError("string repetition too long")
        if op is ast.Pow and abs(right) > CALCULATOR_MAX_EXPONENT:
            raise CalculatorError("exponent too large")
        return _checked(_BINARY_OPS[op](left, right))
    if isinstance(node, ast.Call) and not node.keywords:
        args = [_evaluate(arg) for arg in node.args]
        if isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
            return _checked(_FUNCTIONS[node.func.id](*args))
        if isinstance(node.func, ast.Attribute) and node.func.attr in _STR_METHODS:
            receiver = _evaluate(node.func.value)
            if not isinstance(receiver, str) or not all(isinstance(arg, (str, int)) for arg in args):
                raise CalculatorError("string methods take a string receiver and str/int arguments")
            return _checked(getattr(receiver, node.func.attr)(*args))
    if isinstance(node, ast.Subscript):
        target = _evaluate(node.value)
        if not isinstance(target, str):
            raise CalculatorError("only strings can be indexed")
        if isinstance(node.slice, ast.Slice):
            bounds = [None if part is None else _evaluate(part) for part in (node.slice.lower, node.slice.upper, node.slice.step)]
            if not all(bound is None or isinstance(bound, int) for bound in bounds):
                raise CalculatorError("slice bounds must be integers")
            return target[slice(*bounds)]
        index = _evaluate(node.slice)
        if not isinstance(index, int):
            raise CalculatorError("string index must be an integer")
        return target[index]
    raise CalculatorError(f"unsupported syntax: {type(node).__name__}")


# ---------------------------------------------------------------------------------------------
# the engine

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
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 42) -> Iterator[tuple[list[int], list[int]]]:
        """Per step, (tokens, masks): one token per sample, mask 1 if sampled, 0 if forced (tool
        output, or padding after the row ended). max_tokens None = until the model's last position."""
        max_tokens = self.max_len - len(tokens) if max_tokens is None else max_tokens
        self._check_request(tokens, num_samples, max_tokens)
        check_sampling(temperature, top_k, top_p)
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
            yield column, masks
            if step == max_tokens - 1 or all(row.stop_token is not None for row in rows):
                return
            ids = torch.tensor(column, dtype=torch.long, device=self.device).view(num_samples, 1)
            logits = self._last_logits(ids, kv_cache)

    def _advance_tool(self, row: _Row, token: int) -> None:
        """Track a sampled token through the tool-call state machine; queue the tool's output."""
        if self.tokenizer is None:
            return
        if token == self.python_start:
            row.in_python, row.python_tokens = True, []
        elif token == self.python_end and row.in_python:
            row.in_python = False
            result = use_calculator(self.tokenizer.decode(row.python_tokens))
            if result is not None:
                row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
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


# ---------------------------------------------------------------------------------------------
# text of a reply: streaming decode, tool-call markers

class StreamDecoder:
    """Text of a token stream, piece by piece, emitting only complete UTF-8 characters.

    A byte-level BPE token can end in the middle of a multi-byte character (an emoji is 4 bytes,
    a CJK character 3); its bytes wait in an incremental UTF-8 decoder until the character is
    complete. Special tokens come out as their names ("<|python_start|>"), which is how tool
    calls appear in a reply's text (`assistant_parts` reads them back). Invalid bytes become
    U+FFFD, never an exception.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.special_names = {tokenizer.encode_special(name): name for name in tokenizer.get_special_tokens()}
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """The text completed by `token` (possibly "")."""
        name = self.special_names.get(token)
        if name is not None:
            return self.flush() + name
        return self._utf8.decode(self.tokenizer.enc.decode_single_token_bytes(token))

    def flush(self) -> str:
        """Whatever is still buffered (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


_MARKER_PART = {"<|python_start|>": "python", "<|output_start|>": "python_output",
                "<|python_end|>": "text", "<|output_end|>": "text"}
_MARKERS = re.compile("(" + "|".join(re.escape(marker) for marker in _MARKER_PART) + ")")


def assistant_parts(text: str) -> str | list[dict[str, str]]:
    """An assistant reply's text (tool calls written as their special tokens, as StreamDecoder
    gives them) as conversation content: the text itself when it has no tool call, else parts
    [{"type": "text"|"python"|"python_output", "text": ...}] for Tokenizer.render_conversation.
    An unclosed call (an interrupted reply) keeps its type up to the end."""
    pieces = _MARKERS.split(text)
    if len(pieces) == 1:
        return text
    parts, kind = [], "text"
    for i, piece in enumerate(pieces):
        if i % 2 == 1:  # a marker: the part type of what follows
            kind = _MARKER_PART[piece]
        elif piece or kind != "text":  # keep empty calls/outputs, drop empty text between markers
            parts.append({"type": kind, "text": piece})
    return parts


def chat_prompt(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    """Prompt ids for the assistant's next reply after `messages` ({"role", "content": str});
    assistant messages may carry tool calls as marker text (see `assistant_parts`)."""
    converted = [{"role": m["role"], "content": assistant_parts(m["content"]) if m["role"] == "assistant" else m["content"]}
                 for m in messages]
    return tokenizer.render_for_completion({"messages": converted})


# ---------------------------------------------------------------------------------------------
# loading a chat model (chat_cli, chat_web)

@dataclass
class ModelFlags:
    """Which checkpoint to chat with, and where to run it."""

    source: str = field(default="sft", metadata={"short": "-i", "help": "checkpoint kind",
                                                 "choices": ("sft", "mid", "rl", "base")})
    model_tag: str = field(default="", metadata={"short": "-c", "help": "checkpoint directory name (default: newest)"})
    step: int = field(default=-1, metadata={"help": "checkpoint step (-1 = last)"})
    device: str = field(default="", metadata={"help": "cuda|mps|cpu (empty = autodetect)"})
    dtype: str = field(default="auto", metadata={"help": "weights dtype; auto = bfloat16 on CUDA, float32 elsewhere",
                                                 "choices": ("auto", "float32", "bfloat16")})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0 = all cores; chat_web splits them among its workers)"})


def inference_dtype(device_type: str, override: str) -> torch.dtype:
    """The dtype of the weights for decoding: bf16 on CUDA (when supported); float32 on CPU and
    MPS, where decode steps were not faster in bf16 (python -m bench.inference --dtypes=float32,bfloat16)."""
    from nanochat.common import resolve_dtype

    if override == "auto" and device_type != "cuda":
        return torch.float32
    return resolve_dtype(device_type, override)


def load_chat_model(flags: ModelFlags, device: torch.device | str) -> tuple[torch.nn.Module, Tokenizer, dict[str, Any]]:
    """(model in eval mode with weights in the inference dtype, tokenizer, checkpoint meta);
    raises CheckpointError / FileNotFoundError / ValueError naming what is missing or mismatched."""
    from nanochat.checkpoint import load_model
    from nanochat.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    model, meta = load_model(flags.source, flags.model_tag, flags.step, device)
    if model.config.vocab_size != tokenizer.get_vocab_size():
        raise ValueError(f"checkpoint {meta['checkpoint_dir']} has vocab_size {model.config.vocab_size} but the tokenizer "
                         f"has {tokenizer.get_vocab_size()}: was the tokenizer retrained after this model?")
    model.to(inference_dtype(torch.device(device).type, flags.dtype))
    return model, tokenizer, meta


def open_chat_engine(flags: ModelFlags, dtype: str = "auto") -> tuple[Engine, Tokenizer, dict[str, Any], Any]:
    """What chat_cli, chat_eval and the chat benches start with: runtime setup and an Engine on
    the checkpoint `flags` name. A missing or mismatched checkpoint is one line and exit 1."""
    from nanochat.checkpoint import CheckpointError
    from nanochat.common import compute_init, fail

    ctx = compute_init(flags.device, dtype, seed=0, threads=flags.threads)
    try:
        model, tokenizer, meta = load_chat_model(flags, ctx.device)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    return Engine(model, tokenizer), tokenizer, meta, ctx
