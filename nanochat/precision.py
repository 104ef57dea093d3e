"""Training precision: bf16 weights updated with stochastic rounding, the gradient-accumulation
buffer's dtype, and 8-bit optimizer states (--param_dtype, --grad_dtype, --optim_state of
model_flags.MemoryFlags; optim.setup_optimizers applies them). All off by default.

bf16 weights (param_dtype="bfloat16"): every parameter lives in bf16 (2 B), the 1-D lambdas and the
gates included (a dimensioned fp32 lambda would promote the bf16 residual stream to fp32), with no
fp32 master copy. An optimizer computes a parameter's new value in fp32 (a transient of that one
parameter) and rounds it stochastically: up with probability (value - lower) / (upper - lower), so
the rounded weight equals the fp32 one in expectation and updates below half a bf16 ulp still move
it (round-to-nearest would drop them). The random bits of an update depend only on (run seed,
optimizer, parameter index, that parameter's update count "sr_step" in the optimizer state): every
rank draws the same bits whichever rank updates which parameter, and a resumed run draws the bits
of the uninterrupted one.

Gradient buffer (grad_dtype): auto = the weights' dtype; autograd sums the micro-batches into
p.grad. float32 under bf16 weights: after each micro-batch's backward, its bf16 gradient is added
into an fp32 buffer (p.accumulated_grad, through register_post_accumulate_grad_hook) and p.grad is
dropped, so the sum is fp32 (4 B) and one bf16 gradient per parameter lives at a time. `gradient(p)`
is how optimizers, clipping and the all-reduce read either. bfloat16 under fp32 weights is refused:
autograd makes each fp32 gradient in fp32 anyway, and rounding the sum to 8 bits of mantissa under
full-precision weights is a trade no practitioner makes.

8-bit states (optim_state="int8"): Muon's momentum (dense (out, in), and MoleGrad's low-rank
(out, k), also while it is transported to a new subspace) and AdamW's two moments, quantized in
blocks of QUANT_BLOCK values that share one fp32 absmax scale, on the dynamic-tree map of 8-bit
optimizers (Dettmers et al., arXiv 2110.02861; torchao's create_dynamic_map, signed for momenta and
first moments, unsigned for second moments): 1 + 4/256 B per value. A state is dequantized to fp32
for its parameter's update and quantized back: Muon's for the whole matrix (Newton–Schulz needs
it), AdamW's span by span (SPAN values at a time), so an embedding's transients stay small. Stored
as plain tensors ("<name>_codes" uint8 of numel rounded up to whole blocks, "<name>_scale" fp32 per
block), so an optimizer state_dict loads with torch.load(weights_only=True). Tensors of fewer than
MIN_QUANTIZED_NUMEL values keep fp32 state, as in torchao and bitsandbytes: the lambdas and gates.
torchao (the optional `lowmem` extra, imported only when int8 states are asked for) supplies the
map; the quantization is a search among its midpoints (OptimizerStates.quantize says why).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn

from nanochat.config import UserError

PARAM_DTYPES = ("float32", "bfloat16")
GRAD_DTYPES = ("auto", "float32", "bfloat16")
OPTIM_STATES = ("float32", "int8")
PRECISION_OPTIONS = ("param_dtype", "grad_dtype", "optim_state")  # setup_optimizers' keywords, the flags' names
QUANT_BLOCK = 256  # values per fp32 scale (torchao's block size)
MIN_QUANTIZED_NUMEL = 4096  # smaller tensors keep fp32 state (torchao's and bitsandbytes' threshold)
SPAN = 1 << 22  # values an elementwise update (AdamW) handles at a time: a multiple of QUANT_BLOCK
MISSING_TORCHAO = "8-bit optimizer states need torchao, the lowmem extra: pip install -e '.[lowmem]'"


def check_precision_options(param_dtype: str = "float32", grad_dtype: str = "auto", optim_state: str = "float32") -> None:
    """The value checks of the precision options: a ValueError names the option as the flags spell
    it ("grad_dtype=bfloat16: ..."). int8 states need torchao, looked up without importing it."""
    for name, value, choices in (("param_dtype", param_dtype, PARAM_DTYPES), ("grad_dtype", grad_dtype, GRAD_DTYPES),
                                 ("optim_state", optim_state, OPTIM_STATES)):
        if value not in choices:
            raise ValueError(f"{name}={value!r}: expected one of {'|'.join(choices)}")
    if grad_dtype == "bfloat16" and param_dtype == "float32":
        raise ValueError("grad_dtype=bfloat16: needs --param_dtype=bfloat16; fp32 weights get fp32 gradients from "
                         "autograd, and their sum is kept in fp32 (grad_dtype=auto)")
    if optim_state == "int8" and importlib.util.find_spec("torchao") is None:
        raise ValueError(f"optim_state=int8: {MISSING_TORCHAO}")


# ---------------------------------------------------------------------------------------------
# weights and gradients

def prepare_parameters(model: nn.Module, param_dtype: str = "float32", grad_dtype: str = "auto") -> None:
    """bfloat16: casts every floating-point parameter to bf16 (buffers such as the rotary tables and
    MoleGrad's subspaces keep their dtype); with grad_dtype float32, adds the fp32 accumulation
    hook to each. float32 leaves the model as it is (a float64 test model stays float64). The model
    computes in the compute dtype whatever its weights' (gpt.Linear casts the weight to the input's
    dtype; on a CPU the residual stream stays at least fp32)."""
    check_precision_options(param_dtype, grad_dtype)
    if param_dtype != "bfloat16":
        return
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != torch.bfloat16:
            p.data = p.data.to(torch.bfloat16)
        if grad_dtype == "float32" and not hasattr(p, "accumulated_grad"):
            p.accumulated_grad = None
            p.register_post_accumulate_grad_hook(_accumulate_in_float32)


def _accumulate_in_float32(p: torch.Tensor) -> None:
    if p.grad is None:  # no gradient reached p (a MoleGrad weight's comes as its layer's factor)
        return
    if p.accumulated_grad is None:
        p.accumulated_grad = p.grad.float()
    else:
        p.accumulated_grad.add_(p.grad)
    p.grad = None


def gradient(p: torch.Tensor) -> torch.Tensor | None:
    """p's gradient of this step: p.grad, or its fp32 accumulation buffer (grad_dtype float32)."""
    return p.grad if p.grad is not None else getattr(p, "accumulated_grad", None)


def drop_gradients(params: Iterable[torch.Tensor]) -> None:
    """Forget the gradients of `params`: p.grad and the fp32 accumulation buffer alike."""
    for p in params:
        p.grad = None
        if getattr(p, "accumulated_grad", None) is not None:
            p.accumulated_grad = None


# ---------------------------------------------------------------------------------------------
# stochastic rounding

def stochastic_round_(out: torch.Tensor, value: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """out (bf16) <- value (fp32) rounded to one of its two bf16 neighbours, away from zero with
    probability (the 16 low bits of value) / 2^16, so that E[out] = value: uniform random 16 low
    bits are added to value's bit pattern (a carry moves it to the next bf16 value) and truncated."""
    bits = torch.randint(0, 1 << 16, value.shape, generator=generator, device=value.device, dtype=torch.int32)
    bits.add_(value.view(torch.int32)).bitwise_and_(-65536)  # -65536 = 0xFFFF0000: keep the top 16 bits
    out.copy_(bits.view(torch.float32))  # exact: the low 16 bits are zero


class StochasticRounding:
    """Stochastic rounding of one optimizer's bf16 parameters, with random bits that depend only on
    (seed, stream, parameter index, step); stream names the optimizer (two optimizers of one run
    draw different bits for their parameters of the same index)."""

    def __init__(self, seed: int, stream: str) -> None:
        self.seed, self.stream = seed, stream
        self._generators: dict[torch.device, torch.Generator] = {}

    def round_into(self, p: torch.Tensor, value: torch.Tensor, index: int, step: int, part: int = 0) -> None:
        """p (bf16) <- value (fp32), rounded with the bits of (index, step, part): part numbers the
        spans of one update that runs span by span (OptimizerStates.spans)."""
        generator = self._generators.get(value.device)
        if generator is None:
            generator = self._generators[value.device] = torch.Generator(device=value.device)
        key = hashlib.blake2b(f"{self.seed}/{self.stream}/{index}/{step}/{part}".encode(), digest_size=8).digest()
        generator.manual_seed(int.from_bytes(key, "little") >> 1)  # a hash: unrelated seeds for any two keys
        stochastic_round_(p, value, generator)


# ---------------------------------------------------------------------------------------------
# 8-bit states

@contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    levels = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in levels:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in levels:
            logger.setLevel(level)


def torchao_quant_utils() -> Any:
    """torchao.optim.quant_utils, imported on first use without the lines its import logs (CUDA
    extensions that do not load on this build, a torch deprecation); a UserError naming the extra
    when torchao is missing."""
    try:
        with _quiet("torchao", "torch.utils._pytree"):
            from torchao.optim import quant_utils
    except ImportError:
        raise UserError(MISSING_TORCHAO) from None
    return quant_utils


class OptimizerStates:
    """Where an optimizer keeps its per-parameter states: fp32 tensors (optim_state float32; the
    weights' dtype when wider) or 8-bit (int8, module docstring). `load` gives the working fp32
    values of a state (zeros at first), `store` puts them back: the whole state, shaped like its
    parameter, or one `span` of its flattened values (`spans`: each starts on a block boundary), so
    that an elementwise update needs transients of one span only. A state saved in the other
    representation (a run resumed with another --optim_state) is converted when first loaded."""

    def __init__(self, optim_state: str = "float32") -> None:
        check_precision_options(optim_state=optim_state)
        self.quantized = optim_state == "int8"
        self.min_numel = MIN_QUANTIZED_NUMEL
        self._qmaps: dict[tuple[bool, torch.device], torch.Tensor] = {}
        self._code_tables: dict[tuple[bool, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._quant_utils = torchao_quant_utils() if self.quantized else None  # a missing torchao fails here

    @property
    def quant_utils(self) -> Any:
        if self._quant_utils is None:  # float32 states that read an int8 checkpoint
            self._quant_utils = torchao_quant_utils()
        return self._quant_utils

    @staticmethod
    def spans(numel: int) -> list[tuple[int, int]]:
        """[start, end) ranges of at most SPAN values covering `numel` values, in order."""
        return [(start, min(numel, start + SPAN)) for start in range(0, numel, SPAN)]

    @staticmethod
    def holds(state: dict, name: str) -> bool:
        return name in state or f"{name}_codes" in state

    def load(self, state: dict, name: str, like: torch.Tensor, signed: bool = True,
             span: tuple[int, int] | None = None) -> torch.Tensor:
        """State `name` of the parameter `like`, fp32 (or wider): whole, or the flat values of `span`.
        An fp32 state is returned itself (a view for a span): updates in place are stored."""
        self._convert(state, name, like, signed)
        start, end = span or (0, like.numel())
        if name in state:
            return state[name] if span is None else state[name].view(-1)[start:end]
        first, last = start // QUANT_BLOCK, -(-end // QUANT_BLOCK)
        values = self.dequantize(state[f"{name}_codes"][first * QUANT_BLOCK:last * QUANT_BLOCK],
                                 state[f"{name}_scale"][first:last], signed)[:end - start]
        values = values.to(torch.promote_types(like.dtype, torch.float32))
        return values.view(like.shape) if span is None else values

    def store(self, state: dict, name: str, value: torch.Tensor, signed: bool = True,
              span: tuple[int, int] | None = None) -> None:
        """Puts back what `load` gave (or a new value of the whole state, e.g. a transported one)."""
        if name in state:
            if span is None:
                state[name] = value
            elif state[name].view(-1)[span[0]:span[1]].data_ptr() != value.data_ptr():
                state[name].view(-1)[span[0]:span[1]].copy_(value)
            return
        first = (span[0] if span else 0) // QUANT_BLOCK
        codes, scale = self.quantize(value, signed)
        state[f"{name}_codes"][first * QUANT_BLOCK:first * QUANT_BLOCK + codes.numel()] = codes
        state[f"{name}_scale"][first:first + scale.numel()] = scale

    def _convert(self, state: dict, name: str, like: torch.Tensor, signed: bool) -> None:
        """State `name` in this optimizer's representation for `like`: created (zeros), or converted."""
        if self.quantized and like.numel() >= self.min_numel:
            if f"{name}_codes" not in state:
                plain = state.pop(name, None)
                if plain is not None:
                    state[f"{name}_codes"], state[f"{name}_scale"] = self.quantize(plain, signed)
                    return
                blocks = -(-like.numel() // QUANT_BLOCK)
                zero = int(torch.nonzero(self.qmap(signed, like.device) == 0)[0])  # both maps hold 0 exactly
                state[f"{name}_codes"] = torch.full((blocks * QUANT_BLOCK,), zero, dtype=torch.uint8, device=like.device)
                state[f"{name}_scale"] = torch.ones(blocks, device=like.device)
        elif name not in state:
            dtype = torch.promote_types(like.dtype, torch.float32)
            codes, scale = state.pop(f"{name}_codes", None), state.pop(f"{name}_scale", None)
            state[name] = (torch.zeros(like.shape, dtype=dtype, device=like.device) if codes is None else
                           self.dequantize(codes, scale, signed)[:like.numel()].view(like.shape).to(dtype))

    def qmap(self, signed: bool, device: torch.device) -> torch.Tensor:
        """The 256 code values, sorted, in [-1, 1] (signed) or [0, 1]."""
        key = (signed, device)
        if key not in self._qmaps:
            self._qmaps[key] = torch.tensor(self.quant_utils.create_dynamic_map(signed), dtype=torch.float32, device=device)
        return self._qmaps[key]

    def code_table(self, signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(base int32 (65536,), cut fp32 (65536,)) over the top 16 bits of an fp32 value y (its bf16
        truncation): the nearest code of y is base + (y >= cut). The fp32 values that share their
        top 16 bits span [lo, hi], at most 2^-7 apart relative; the map's codes are at least 1.4%
        apart, so at most one midpoint between codes lies in (lo, hi]: cut (inf if none), and base
        is the nearest code of lo."""
        key = (signed, device)
        if key not in self._code_tables:
            qmap = self.qmap(signed, device)
            midpoints = (qmap[1:] + qmap[:-1]) * 0.5  # (255,)
            bits = torch.arange(1 << 16, dtype=torch.int32, device=device) << 16
            ends = torch.stack([bits.view(torch.float32), (bits | 0xFFFF).view(torch.float32)]).nan_to_num(0.0, 0.0, 0.0)
            lo, hi = ends.amin(0), ends.amax(0)
            base, top = (torch.searchsorted(midpoints, end, out_int32=True, right=True) for end in (lo, hi))
            if (top - base).max() > 1:
                raise ValueError("code_table: two code midpoints within one bf16 interval; the map is too fine")
            cut = torch.where(top > base, midpoints[base.clamp(max=midpoints.numel() - 1)], torch.full_like(lo, torch.inf))
            self._code_tables[key] = base, cut
        return self._code_tables[key]

    def quantize(self, value: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes uint8 (blocks * QUANT_BLOCK,), scale fp32 (blocks,)) of `value`, flattened and
        padded with zeros to whole blocks: each value divided by its block's absmax, then the
        nearest code (ties up, as torchao), through code_table: two gathers per value, where
        torchao's eager binary search keeps int64 temporaries of ~30 B per value and a search
        among the midpoints is 2x slower on a CPU."""
        flat = value.detach().reshape(-1).float()
        blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % QUANT_BLOCK)).view(-1, QUANT_BLOCK)  # (blocks, 256)
        scale = blocks.abs().amax(dim=1).clamp_min(1e-12)  # (blocks,)
        normalized = (blocks / scale[:, None]).view(-1)
        base, cut = self.code_table(signed, value.device)
        key = (normalized.view(torch.int32) >> 16) & 0xFFFF
        codes = base.index_select(0, key).add_(normalized >= cut.index_select(0, key))
        return codes.to(torch.uint8), scale

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, signed: bool) -> torch.Tensor:
        """The flat fp32 values (blocks * QUANT_BLOCK,) of quantize()'s codes and scales."""
        values = self.qmap(signed, codes.device).index_select(0, codes.int()).view(-1, QUANT_BLOCK)  # (blocks, 256)
        return values.mul_(scale[:, None]).view(-1)
