"""The GPT model.

Rotary embeddings, QK norm, grouped-query attention (`n_kv_head`), ReLU² MLP, RMSNorm without
parameters (also right after the embedding and before the head), untied embedding and LM head,
logit softcap, no biases. `config_from_depth` sizes width and heads from one knob, `--depth`.

Memory: what autograd keeps for backward, per token, d = n_embd (measured with saved-tensor hooks
by `python -m pytest tests/test_gpt.py -k saved_bytes`):
- RMSNorm is an autograd Function that keeps its output in the compute dtype (the next Linear or
  SDPA keeps that same tensor) instead of its fp32 input, and QK norm adds nothing beyond SDPA's q, k;
- the MLP's ReLU² and down-projection are one Function that keeps only the pre-activation h (4d)
  and recomputes relu(h)² in backward, instead of relu(h) and relu(h)² (8d);
- `recompute="mlp"` / `"block"` rerun the MLP / the whole block in backward
  (torch.utils.checkpoint), keeping only its fp32 input (d).
  One block (d = 128), bytes per token:   none      mlp       block
    bf16 autocast                        20.25 d   14.2 d    4 d
    fp32                                 40.25 d   24.2 d    4 d
  (none = normed x, q, k, v, attention out, MLP normed x, h: 10 values of d in the compute dtype.)
- the LM head + softcap + cross-entropy runs over chunks of `loss_chunk_rows` tokens and never
  holds all the (tokens, vocab) logits: it keeps one (tokens, d) tensor in the compute dtype
  (2d bytes per token under bf16) where the plain head keeps 6 bytes per vocabulary entry per
  token under bf16 autocast, 8 in fp32 (384 KiB per token at vocab 65,536).

MoleGrad (`streaming_rank_k > 0`, nanochat/streaming_linear.py): every Linear of the blocks is
created by `GPT._linear(in, out, layer_idx, name)`, which makes the Linears that
`streaming_targets` names (STREAMING_TARGET_LINEARS) StreamingLinears of rank k, each with its
own seed. An MLP whose two Linears stream runs as one `streaming_mlp`, which recomputes h in
backward: ReLU² would otherwise keep the 4d-wide h alive and MoleGrad's compression of c_proj's
input would save nothing. One block, d = 256, k = 32, bytes saved for backward per token
(`python -m pytest tests/test_molegrad.py -k saved_bytes -s`):
                      dense   recompute=mlp  recompute=block  ffn_only  attn_only   all
    fp32              10296        6196           1024          6456      10808     6968
    bf16 autocast      5176        3636           1024          3256       5432     3512
i.e. dense 10d values, ffn_only 6d + 2k, attn_only 10d + 4k, all 6d + 6k (plus 56 bytes of norm
scales and SDPA's logsumexp). The streaming MLP keeps its normed input (d values in the compute
dtype, which its RMSNorm keeps anyway), x Q1 and relu²(h) Q2 (2k), and a 4-byte norm scale.
Folding that RMSNorm into streaming_mlp (keep the fp32 residual, 4d bytes, and recompute the
norm) would save those 4 bytes in fp32 and cost 2d - 4 bytes under bf16, so it is not done.
The attention Linears' inputs are kept by their RMSNorm and by SDPA (q, k, v, out) anyway, so
MoleGrad on attention adds its x Q (k per Linear) and saves no activation memory: its gains there
are the dW FLOPs, the absent (out, in) gradients and the communication. Under recompute, a MoleGrad layer's forward statistics are taken twice per
micro-batch (sums and token counts both double: the same subspace update, more FLOPs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanochat.optim import STREAMING_MOMENTA, AdamW, Muon
from nanochat.streaming_linear import SUBSPACE_STATE, StreamingLinear, streaming_layers, streaming_mlp, zero_factor_grad

if TYPE_CHECKING:
    from nanochat.engine import KVCache

RECOMPUTE_MODES = ("none", "mlp", "block")
# --streaming_target_layers -> the Linears of every block that MoleGrad compresses
STREAMING_TARGET_LINEARS = {
    "ffn_only": ("mlp.c_fc", "mlp.c_proj"),
    "attn_only": ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj"),
    "all": ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
}
STREAMING_TARGETS = tuple(STREAMING_TARGET_LINEARS)
BLOCK_LINEARS = STREAMING_TARGET_LINEARS["all"]
ROTARY_BASE = 10000.0
# The rotary table covers this many times sequence_len, so sampling can run past the training context.
ROTARY_LENGTH_FACTOR = 10
# Tokens per chunk of the LM head + cross-entropy: at vocab 65,536 one fp32 chunk of logits is 256 MiB.
LOSS_CHUNK_ROWS = 1024


# ---------------------------------------------------------------------------------------------
# configuration

@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    softcap: float = 15.0
    # memory options
    recompute: str = "none"  # none | mlp | block: exact activation recompute in backward
    streaming_rank_k: int = 0  # MoleGrad rank k; 0 = off (dense weight gradients)
    streaming_targets: str = "ffn_only"  # ffn_only | attn_only | all
    streaming_power_iters: int = 1
    streaming_warm_start_decay: float = 0.95
    streaming_momentum: str = "dense"  # dense | lowrank: Muon's momentum for MoleGrad matrices

    def __post_init__(self) -> None:
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name}: expected a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_embd: expected a multiple of n_head={self.n_head}, got {self.n_embd}")
        if self.n_kv_head > self.n_head or self.n_head % self.n_kv_head != 0:
            raise ValueError(f"GPTConfig.n_kv_head: expected a divisor of n_head={self.n_head}, got {self.n_kv_head}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"GPTConfig.n_embd / n_head: rotary embeddings need an even head_dim, "
                             f"got {self.n_embd} / {self.n_head} = {self.head_dim}")
        if not self.softcap > 0:
            raise ValueError(f"GPTConfig.softcap: expected > 0, got {self.softcap!r}")
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"GPTConfig.recompute: expected one of {'|'.join(RECOMPUTE_MODES)}, got {self.recompute!r}")
        if self.streaming_targets not in STREAMING_TARGETS:
            raise ValueError(f"GPTConfig.streaming_targets: expected one of {'|'.join(STREAMING_TARGETS)}, "
                             f"got {self.streaming_targets!r}")
        if self.streaming_rank_k < 0:
            raise ValueError(f"GPTConfig.streaming_rank_k: expected >= 0 (0 = off), got {self.streaming_rank_k}")
        if self.streaming_rank_k > self.n_embd:
            # every target set holds Linears whose input is the model width: c_q, c_k, c_v, c_fc
            raise ValueError(f"--streaming_rank_k={self.streaming_rank_k} (GPTConfig.streaming_rank_k): expected at most "
                             f"{self.n_embd}, the input width n_embd={self.n_embd} of the targeted "
                             f"{self.streaming_targets} Linears (k <= in_features of every targeted layer)")
        if self.streaming_power_iters < 1:
            raise ValueError(f"GPTConfig.streaming_power_iters: expected >= 1, got {self.streaming_power_iters}")
        if self.streaming_momentum not in STREAMING_MOMENTA:
            raise ValueError(f"GPTConfig.streaming_momentum: expected one of {'|'.join(STREAMING_MOMENTA)}, "
                             f"got {self.streaming_momentum!r}")
        if not 0.0 <= self.streaming_warm_start_decay < 1.0:
            raise ValueError(f"GPTConfig.streaming_warm_start_decay: expected a value in [0, 1), "
                             f"got {self.streaming_warm_start_decay}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def config_from_depth(
    depth: int,
    vocab_size: int,
    sequence_len: int,
    aspect_ratio: int = 64,
    head_dim: int = 128,
    n_kv_head: int | None = None,
    **options,
) -> GPTConfig:
    """A GPTConfig sized by `depth` alone, as nanochat: width ≈ depth * aspect_ratio.

    Head-size rule: heads are `head_dim` wide (128) when the target width holds at least two of
    them; narrower models (depth < 4 at the default ratio) use 64-wide heads instead, so they get
    several heads rather than one fat head (a 128-wide model gets 2 heads of 64, not 1 of 128).
    The width is then rounded up to a whole number of heads: n_embd = n_head * head_dim.
    E.g. depth 2 -> 2 x 64 = 128, depth 4 -> 2 x 128 = 256, depth 6 -> 3 x 128 = 384,
    depth 20 -> 10 x 128 = 1280. `n_kv_head` defaults to n_head (plain multi-head attention).
    `options` are the remaining GPTConfig fields (softcap, recompute, streaming_*).
    """
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth: expected a positive integer, got {depth!r}")
    if aspect_ratio < 1:
        raise ValueError(f"aspect_ratio: expected a positive integer, got {aspect_ratio!r}")
    if head_dim < 2 or head_dim % 2 != 0:
        raise ValueError(f"head_dim: expected an even integer >= 2 (rotary), got {head_dim!r}")
    target_width = depth * aspect_ratio
    if target_width < 2 * head_dim:
        head_dim = min(head_dim, 64)
    n_head = max(1, math.ceil(target_width / head_dim))
    return GPTConfig(
        sequence_len=sequence_len,
        vocab_size=vocab_size,
        n_layer=depth,
        n_head=n_head,
        n_kv_head=n_head if n_kv_head is None else n_kv_head,
        n_embd=n_head * head_dim,
        **options,
    )


# ---------------------------------------------------------------------------------------------
# building blocks

def compute_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on for `device_type`, else `default`."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return default


class RMSNorm(torch.autograd.Function):
    """y = x / sqrt(mean(x²) + eps) over the last dim, written in `dtype`; keeps only y and rstd.

    Backward needs no x: dx = rstd * (g - y * mean(g * y)). Keeping the output in the compute
    dtype (which the next Linear or SDPA keeps too, so it is stored once) instead of the fp32
    input saves 4 bytes per element per norm under bf16; F.rms_norm on bf16 CPU tensors would
    also upcast and keep fp32 copies. eps = finfo(x.dtype).eps, as F.rms_norm's default.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        acc_dtype = torch.promote_types(x.dtype, torch.float32)
        sumsq = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc_dtype).square_()  # (..., 1)
        rstd = sumsq.div_(x.size(-1)).add_(torch.finfo(x.dtype).eps).rsqrt_()
        y = torch.empty(x.shape, dtype=dtype, device=x.device)
        torch.mul(x, rstd.to(x.dtype), out=y)  # computed in x's dtype, written in `dtype`: one pass
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        y, rstd = ctx.saved_tensors
        x_dtype = ctx.x_dtype
        mean_gy = (grad * y).sum(dim=-1, keepdim=True, dtype=rstd.dtype).div_(y.size(-1))  # (..., 1)
        # (g - y * mean(g y)) * rstd, computed in the wider of x's and y's dtypes (mean_gy carries x's)
        grad_x = torch.addcmul(grad, y, mean_gy.to(x_dtype), value=-1.0).mul_(rstd.to(x_dtype))
        return grad_x.to(x_dtype), None


def norm(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm without parameters over the last dimension, output in `dtype` (default x.dtype)."""
    return RMSNorm.apply(x, x.dtype if dtype is None else dtype)


def rotary_tables(seq_len: int, head_dim: int, base: float = ROTARY_BASE,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (seq_len, 1, head_dim) in float32, laid out for `apply_rotary`:
    cos = [c, c], sin = [s, -s] with c, s of shape (seq_len, head_dim/2) (frequencies in float64)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv_freq)  # (T, D/2)
    cos, sin = angles.cos(), angles.sin()
    cos = torch.cat((cos, cos), dim=-1).float()
    sin = torch.cat((sin, -sin), dim=-1).float()
    return cos.unsqueeze(1), sin.unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + D/2]) of x (B, T, H, D) by position-dependent angles.

    y1 = x1 c + x2 s, y2 = x2 c - x1 s, written as x * [c, c] + [x2, x1] * [s, -s]: three passes
    (cat, mul, addcmul), and backward keeps only the constant tables, never x.
    """
    half = x.size(-1) // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, swapped, sin)


class ReLUSquaredLinear(torch.autograd.Function):
    """y = relu(h)² Wᵀ (the MLP's activation + down-projection), keeping only h (and W) for backward.

    Backward recomputes relu(h)² for dW: two extra elementwise passes over h instead of keeping
    4d values per token alive. Computes in h's dtype (the compute dtype: bf16 under autocast),
    casting W explicitly, because autocast is not active during backward.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        return F.linear(torch.relu(h).square_(), weight.to(h.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        h, weight = ctx.saved_tensors
        grad = grad.to(h.dtype)
        relu_h = torch.relu(h)  # (..., 4d)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # dW = gᵀ relu(h)²: (d, N) @ (N, 4d)
            grad_weight = (grad.reshape(-1, grad.size(-1)).t() @ relu_h.square().reshape(-1, h.size(-1))).to(weight.dtype)
        grad_h = None
        if ctx.needs_input_grad[0]:
            grad_h = (grad @ weight.to(h.dtype)).mul_(relu_h.mul_(2))  # d relu(h)² / dh = 2 relu(h)
        return grad_h, grad_weight


def relu_squared_linear(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return ReLUSquaredLinear.apply(h, weight)


# ---------------------------------------------------------------------------------------------
# LM head + softcap + cross-entropy, chunked over tokens

def _softcap_cross_entropy_chunk(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
    acc_dtype: torch.dtype, row_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row loss for one chunk, and d(sum_i row_scale_i * loss_i)/dz (z = hidden Wᵀ) if row_scale is given.

    hidden (n, d) and weight (V, d) in the compute dtype; targets (n,) with -1 = ignored;
    returns losses (n,) in acc_dtype (fp32, or fp64 for a fp64 model) and dz (n, V) in the
    compute dtype.

    Written for few passes over the (n, V) tensors (they dominate the cost on CPU):
    softcap * tanh(z / softcap) = softcap * (2s - 1) with s = sigmoid(2z / softcap) (sigmoid is
    ~6x faster than tanh on CPU), so logits - max = 2 softcap (s - max s);
    d logits / dz = 1 - tanh² = 4 s (1 - s).
    """
    s = torch.empty(hidden.size(0), weight.size(0), dtype=acc_dtype, device=hidden.device)  # (n, V)
    torch.mul(hidden @ weight.t(), 2.0 / softcap, out=s).sigmoid_()
    shift = s.amax(dim=1, keepdim=True).mul_(-2.0 * softcap)  # (n, 1): -(max logit + softcap)
    exp_logits = torch.add(shift, s, alpha=2.0 * softcap).exp_()  # exp(logits - max logit)
    sum_exp = exp_logits.sum(dim=1)  # (n,)
    lse = sum_exp.log() - shift.squeeze(1) - softcap  # logsumexp of the logits
    index = targets.clamp(min=0).unsqueeze(1)  # (n, 1)
    target_logit = softcap * (2.0 * s.gather(1, index).squeeze(1) - 1.0)
    losses = (lse - target_logit).masked_fill_(targets < 0, 0.0)
    if row_scale is None:
        return losses, None
    # dz = row_scale * (softmax - onehot(target)) * 4 s (1 - s); the factor 4 rides on the row scale
    scale4 = 4.0 * row_scale
    probs = exp_logits.mul_((scale4 / sum_exp).unsqueeze(1))
    probs.scatter_add_(1, index, -scale4.unsqueeze(1))
    dz = torch.empty(probs.shape, dtype=hidden.dtype, device=hidden.device)
    torch.mul(probs, torch.addcmul(s, s, s, value=-1.0), out=dz)  # written in the compute dtype in one pass
    return losses, dz


def _accumulate_weight_grad(grad_weight: torch.Tensor, dz: torch.Tensor, hidden: torch.Tensor) -> None:
    """grad_weight (V, d) += dzᵀ hidden, accumulating in grad_weight's dtype (the parameter's)."""
    if dz.dtype == grad_weight.dtype:
        grad_weight.addmm_(dz.t(), hidden)
    else:  # bf16 matmul, fp32 accumulation across chunks
        grad_weight.add_(dz.t() @ hidden)


def _row_scale(targets: torch.Tensor, reduction: str, grad_output: torch.Tensor | None,
               n_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """d(output)/d(loss_i) times the upstream gradient, per row; 0 for ignored rows. (N,)"""
    scale = (targets >= 0).to(dtype)
    if reduction == "mean":
        scale = scale / n_valid
    if grad_output is not None:
        scale = scale * grad_output.to(dtype)
    return scale


class ChunkedSoftcapCrossEntropy(torch.autograd.Function):
    """cross_entropy(softcap * tanh(hidden Wᵀ / softcap), targets), never holding all the logits.

    For a scalar loss (mean/sum) that will be differentiated, the gradients are computed during
    forward, chunk by chunk while each chunk's logits are at hand (exact: the upstream gradient
    of a scalar just scales them), so the head's matmul is not recomputed; what is kept for
    backward is d loss / d hidden (N, d) and d loss / d W (V, d, like W.grad). For per-row losses
    (reduction "none", e.g. RL) the upstream gradient is per row and only known in backward:
    then forward keeps hidden (N, d) and backward recomputes each chunk's logits.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
                reduction: str, chunk_rows: int, grads_in_forward: bool) -> torch.Tensor:
        # hidden (N, d) in the compute dtype, weight (V, d), targets (N,) int64 with -1 = ignored
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
        weight_c = weight.to(hidden.dtype)
        n_valid = (targets >= 0).sum()
        losses = torch.empty(hidden.size(0), dtype=acc_dtype, device=hidden.device)  # (N,)
        row_scale = _row_scale(targets, reduction, None, n_valid, acc_dtype) if grads_in_forward else None
        grad_hidden = torch.empty_like(hidden) if grads_in_forward else None
        grad_weight = torch.zeros_like(weight) if grads_in_forward else None
        for start in range(0, hidden.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            losses[rows], dz = _softcap_cross_entropy_chunk(
                hidden[rows], weight_c, targets[rows], softcap, acc_dtype,
                None if row_scale is None else row_scale[rows])
            if dz is not None:
                grad_hidden[rows] = dz @ weight_c
                _accumulate_weight_grad(grad_weight, dz, hidden[rows])
        ctx.grads_in_forward = grads_in_forward
        ctx.softcap, ctx.reduction, ctx.chunk_rows = softcap, reduction, chunk_rows
        if grads_in_forward:
            ctx.save_for_backward(grad_hidden, grad_weight)
        else:
            ctx.save_for_backward(hidden, weight, targets, n_valid)
        if reduction == "none":
            return losses
        total = losses.sum()
        return total / n_valid if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.grads_in_forward:
            grad_hidden, grad_weight = ctx.saved_tensors
            return grad_hidden * grad_output.to(grad_hidden.dtype), grad_weight * grad_output, None, None, None, None, None
        hidden, weight, targets, n_valid = ctx.saved_tensors
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
        weight_c = weight.to(hidden.dtype)
        row_scale = _row_scale(targets, ctx.reduction, grad_output, n_valid, acc_dtype)  # (N,)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        for start in range(0, hidden.size(0), ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            _, dz = _softcap_cross_entropy_chunk(hidden[rows], weight_c, targets[rows], ctx.softcap,
                                                 acc_dtype, row_scale[rows])
            grad_hidden[rows] = dz @ weight_c
            _accumulate_weight_grad(grad_weight, dz, hidden[rows])
        return grad_hidden, grad_weight, None, None, None, None, None


def chunked_softcap_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
    reduction: str = "mean", chunk_rows: int = LOSS_CHUNK_ROWS,
) -> torch.Tensor:
    """Loss of the softcapped LM head over hidden (N, d) with targets (N,) (-1 = ignored).

    reduction: "mean" over non-ignored targets, "sum", or "none" (per-token (N,), 0 where ignored).
    Computed in at least float32, whatever the compute dtype of `hidden`.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"loss_reduction: expected mean|sum|none, got {reduction!r}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows: expected >= 1, got {chunk_rows}")
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return ChunkedSoftcapCrossEntropy.apply(hidden, weight, targets, softcap, reduction, chunk_rows,
                                            needs_grad and reduction != "none")


# ---------------------------------------------------------------------------------------------
# the transformer

LinearFactory = Callable[[int, int, int, str], nn.Module]  # (in_features, out_features, layer_idx, name)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int, linear: LinearFactory) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = linear(config.n_embd, self.n_head * self.head_dim, layer_idx, "attn.c_q")
        self.c_k = linear(config.n_embd, self.n_kv_head * self.head_dim, layer_idx, "attn.c_k")
        self.c_v = linear(config.n_embd, self.n_kv_head * self.head_dim, layer_idx, "attn.c_v")
        self.c_proj = linear(config.n_embd, config.n_embd, layer_idx, "attn.c_proj")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        xn = norm(x, compute_dtype(x.device.type, x.dtype))  # one cast for c_q, c_k, c_v, not three
        q = self.c_q(xn).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(xn).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(xn).view(B, T, self.n_kv_head, self.head_dim)
        # QK norm after rotary (as nanochat). The two commute up to rounding: rotary rotates pairs of
        # channels, which keeps the RMS over head_dim. Norming last feeds SDPA unit-RMS q and k.
        q = norm(apply_rotary(q, cos, sin))
        k = norm(apply_rotary(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        gqa = self.n_kv_head != self.n_head
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)  # (B, H_kv, T_past + T, D)
            prefix = k.size(2) - T
            if prefix == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            elif T == 1:  # one new token sees the whole cache
                y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            else:  # new token i sees the prefix and new tokens 0..i: is_causal would align to the top-left
                visible = torch.ones(T, prefix + T, dtype=torch.bool, device=q.device).tril_(diagonal=prefix)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, H * D)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int, linear: LinearFactory) -> None:
        super().__init__()
        self.c_fc = linear(config.n_embd, 4 * config.n_embd, layer_idx, "mlp.c_fc")
        self.c_proj = linear(4 * config.n_embd, config.n_embd, layer_idx, "mlp.c_proj")
        if isinstance(self.c_fc, StreamingLinear) != isinstance(self.c_proj, StreamingLinear):
            raise ValueError("MLP: MoleGrad compresses both MLP Linears or neither (c_proj's input is relu²(h), "
                             "kept only if h is recomputed)")
        self.streaming = isinstance(self.c_fc, StreamingLinear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xn = norm(x, compute_dtype(x.device.type, x.dtype))  # (B, T, d), kept by the norm for its backward
        if self.streaming:
            return streaming_mlp(xn, self.c_fc, self.c_proj)  # keeps xn, xn Q1, relu²(h) Q2
        return relu_squared_linear(self.c_fc(xn), self.c_proj.weight)  # keeps xn, h


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int, linear: LinearFactory) -> None:
        super().__init__()
        self.recompute = config.recompute
        self.attn = CausalSelfAttention(config, layer_idx, linear)
        self.mlp = MLP(config, layer_idx, linear)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        if self.recompute == "block" and kv_cache is None:
            return checkpoint(self._forward, x, cos, sin, use_reentrant=False)
        return self._forward(x, cos, sin, kv_cache)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(x, cos, sin, kv_cache)
        if self.recompute == "mlp":
            return x + checkpoint(self.mlp, x, use_reentrant=False)
        return x + self.mlp(x)


def _recompute_rotary_after_load(model: "GPT", incompatible_keys) -> None:
    model._init_rotary()


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i, self._linear) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.loss_chunk_rows = LOSS_CHUNK_ROWS
        # Non-persistent: not in checkpoints, recomputed here, in init_weights and after load_state_dict.
        self.rotary_seq_len = config.sequence_len * ROTARY_LENGTH_FACTOR
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.register_load_state_dict_post_hook(_recompute_rotary_after_load)
        self.init_weights()

    def _linear(self, in_features: int, out_features: int, layer_idx: int, name: str) -> nn.Module:
        """Every Linear of the blocks is made here; name is one of BLOCK_LINEARS ("mlp.c_fc", ...).

        MoleGrad's targets are StreamingLinears; each gets its own seed, layer_idx * 6 + the
        name's index, so that the subspaces start different and every process builds the same.
        """
        if name not in BLOCK_LINEARS:
            raise ValueError(f"name: expected one of {'|'.join(BLOCK_LINEARS)}, got {name!r}")
        cfg = self.config
        if cfg.streaming_rank_k > 0 and name in STREAMING_TARGET_LINEARS[cfg.streaming_targets]:
            return StreamingLinear(in_features, out_features, rank_k=cfg.streaming_rank_k,
                                   power_iters=cfg.streaming_power_iters,
                                   warm_start_decay=cfg.streaming_warm_start_decay,
                                   seed=layer_idx * len(BLOCK_LINEARS) + BLOCK_LINEARS.index(name))
        return nn.Linear(in_features, out_features, bias=False)

    def _init_rotary(self) -> None:
        self.cos, self.sin = rotary_tables(self.rotary_seq_len, self.config.head_dim, device=self.lm_head.weight.device)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter (also after building on the meta device and `to_empty`).

        - wte ~ N(0, 1): its output is RMS-normed at once, so the scale only matters relative to
          AdamW's step size, which is tuned for unit-scale rows (as nanochat).
        - c_q, c_k, c_v, c_fc ~ U(±sqrt(3 / fan_in)): std 1/sqrt(fan_in), so unit-RMS (normed)
          inputs give unit-variance outputs; uniform has no outliers.
        - c_proj (attention and MLP) = 0: every block starts as the identity on the residual
          stream, so depth does not blow up the initial activations; the gradient of c_proj is not
          zero (its input is not), so it moves from the first step.
        - lm_head ~ N(0, 0.001): logits start near 0 (loss ≈ ln vocab, no early softcap
          saturation) but, unlike an all-zero head, pass a small gradient back to the blocks
          from the first step.
        - MoleGrad layers: the same weights, and their subspaces back to their seeded start.
        """
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                bound = math.sqrt(3.0 / linear.weight.size(1))
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        for layer in streaming_layers(self):
            layer.reset_subspace()
        self._init_rotary()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Parameters' gradients and MoleGrad's factor gradients (which live beside the parameters)."""
        super().zero_grad(set_to_none)
        zero_factor_grad(self)

    def fit_streaming_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A checkpoint's model state made to fit this model's MoleGrad layers, when the run that
        saved it had other MoleGrad settings (e.g. MoleGrad pretraining, then dense finetuning).

        Weights pass unchanged. Each MoleGrad layer here keeps the checkpoint's subspace if the
        checkpoint has one of the same rank, else its own seeded start; subspaces of layers that
        are dense here are dropped. Not for resuming a run: that needs the same settings.
        """
        own = self.state_dict()
        layers = {name for name, module in self.named_modules() if isinstance(module, StreamingLinear)}

        def layer_of(key: str) -> str | None:
            prefix, _, leaf = key.rpartition(".")
            return prefix if leaf in SUBSPACE_STATE else None

        fits = {name for name in layers
                if all(k in state and state[k].shape == own[k].shape for k in (f"{name}.{leaf}" for leaf in SUBSPACE_STATE))}
        fitted = {k: v for k, v in state.items() if layer_of(k) is None or layer_of(k) in fits}
        fitted.update({k: v for k, v in own.items() if layer_of(k) in layers - fits})
        return fitted

    def num_params(self) -> int:
        """All parameters, embedding included."""
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 per non-embedding parameter (forward 2, backward 4; the
        embedding is a lookup) plus attention's QKᵀ and AV, 12 * n_layer * n_head * head_dim * T
        (counted for the full T x T matrix, as nanochat, not halved for causality)."""
        cfg = self.config
        non_embedding = self.num_params() - self.transformer.wte.weight.numel()
        attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.sequence_len
        return float(6 * non_embedding + attention)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                loss_reduction: str = "mean") -> torch.Tensor:
        """idx (B, T) token ids. With targets (B, T) (-1 = ignored): the loss, a scalar for
        reduction mean/sum, (B, T) for "none". Without: softcapped logits (B, T, vocab) in float32
        (or the model's dtype if wider). With kv_cache, idx holds only the new tokens, placed
        after the cache's current position."""
        B, T = idx.shape
        start = 0 if kv_cache is None else kv_cache.get_pos()
        if start + T > self.rotary_seq_len:
            raise ValueError(f"sequence too long: positions up to {start + T} but the rotary table covers "
                             f"{self.rotary_seq_len} (= {ROTARY_LENGTH_FACTOR} x sequence_len)")
        dtype = compute_dtype(idx.device.type, self.lm_head.weight.dtype)
        cos, sin = self.cos[start:start + T].to(dtype), self.sin[start:start + T].to(dtype)  # (T, 1, head_dim)
        x = norm(self.transformer.wte(idx))  # (B, T, d)
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache)
        x = norm(x, dtype)  # (B, T, d) in the compute dtype
        if targets is None:
            logits = F.linear(x, self.lm_head.weight.to(dtype))  # (B, T, vocab)
            logits = logits.to(torch.promote_types(dtype, torch.float32))
            return self.config.softcap * torch.tanh(logits / self.config.softcap)
        loss = chunked_softcap_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(B * T),
                                             self.config.softcap, loss_reduction, self.loss_chunk_rows)
        return loss.view(B, T) if loss_reduction == "none" else loss

    @torch.inference_mode()
    def generate(self, tokens: list[int], max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42) -> list[int]:
        """The next `max_tokens` tokens after `tokens`, sampled one at a time with a full forward
        over the whole sequence (no KV cache): the slow, obvious reference for the Engine."""
        from nanochat.engine import sample_next_token  # engine imports the model side, not the reverse

        device = self.lm_head.weight.device
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, T)
        new_tokens: list[int] = []
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]  # (1, vocab)
            next_id = sample_next_token(logits, rng, temperature, top_k)  # (1, 1)
            ids = torch.cat((ids, next_id), dim=1)
            new_tokens.append(int(next_id.item()))
        return new_tokens

    def setup_optimizers(self, unembedding_lr: float = 0.004, embedding_lr: float = 0.2, matrix_lr: float = 0.02,
                         weight_decay: float = 0.0, adam_betas: tuple[float, float] = (0.8, 0.95)) -> list[torch.optim.Optimizer]:
        """[AdamW(lm_head, wte), Muon(every matrix of the blocks)], each group with `initial_lr`.

        AdamW LRs scale as (n_embd / 768)^-0.5 (tuned at width 768, as nanochat); Muon's update is
        already normalised per matrix. weight_decay is decoupled and applies to the Muon matrices
        only: the embedding and head rows are RMS-normed / softcapped and get none.

        MoleGrad: every StreamingLinear is a block matrix, so Muon takes its factor gradients
        (config.streaming_momentum picks dense or low-rank momentum). AdamW holds only wte and
        lm_head, which are never compressed (an embedding's gradient is already sparse in rows,
        and the head's input is kept by the chunked loss anyway), so AdamW needs no moments in a
        subspace; a StreamingLinear reaching it is an error.
        """
        for name, p in self.transformer.h.named_parameters():
            if p.ndim != 2:
                raise ValueError(f"setup_optimizers: block parameter {name} has shape {tuple(p.shape)}; Muon takes "
                                 f"only 2-D matrices, so give it an AdamW group here")
        dmodel_lr_scale = (self.config.n_embd / 768) ** -0.5
        adam_groups = [
            {"params": [self.lm_head.weight], "lr": unembedding_lr * dmodel_lr_scale},
            {"params": [self.transformer.wte.weight], "lr": embedding_lr * dmodel_lr_scale},
        ]
        streaming = streaming_layers(self)
        adam_params = {id(p) for group in adam_groups for p in group["params"]}
        if any(id(layer.weight) in adam_params for layer in streaming):
            raise ValueError("setup_optimizers: a MoleGrad layer's weight is in an AdamW group; AdamW reads only p.grad")
        fused = self.lm_head.weight.device.type == "cuda"
        adamw = AdamW(adam_groups, betas=adam_betas, eps=1e-10, weight_decay=0.0, fused=fused)
        muon = Muon(list(self.transformer.h.parameters()), lr=matrix_lr, momentum=0.95, weight_decay=weight_decay,
                    streaming=streaming, streaming_momentum=self.config.streaming_momentum)
        optimizers: list[torch.optim.Optimizer] = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers
