"""Custom autograd pieces of the model, and the chunked loss.

RMSNorm that keeps its output (not its fp32 input), rotary tables and their application,
ReLU² fused with the MLP's down-projection (keeps only h), and the LM head + softcap +
cross-entropy over chunks of tokens (never all the (N, vocab) logits). Each piece is a function
of tensors; nanochat/gpt.py composes them. Memory per token: docs/memory.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ROTARY_BASE = 10000.0
# Tokens per chunk of the LM head + cross-entropy: at vocab 65,536 one fp32 chunk of logits is 256 MiB.
LOSS_CHUNK_ROWS = 1024


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

def softcap_logits(z: torch.Tensor, softcap: float) -> torch.Tensor:
    """softcap * tanh(z / softcap), as softcap * (2 sigmoid(2 z / softcap) - 1): sigmoid is ~2.4x
    faster than tanh on CPU (65,536 x 8 fp32 logits, one thread). The sampling path's logits."""
    return (torch.sigmoid(z * (2.0 / softcap)) - 0.5).mul_(2.0 * softcap)  # sigmoid's output stays intact for backward


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
