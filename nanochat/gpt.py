"""The GPT model.

Rotary embeddings, QK norm, grouped-query attention (`n_kv_head`), ReLU² MLP, RMSNorm without
parameters (also right after the embedding and before the head), untied embedding and LM head,
logit softcap, no biases. `config_from_depth` sizes width and heads from one knob, `--depth`.
Optional recipe pieces from upstream nanochat's 2026 recipe (RECIPE_PIECES, all off by default:
off, the forward is exactly the one above): per-layer residual/x0 lambdas, a smear gate, backout
and value embeddings; docs/recipe.md.
The weights' dtype is not the compute dtype: every Linear casts its weight to its input's dtype, and on
a CPU the residual stream is at least float32 (GPT.stream_dtype), so bf16 weights
(--param_dtype=bfloat16) compute in fp32 there unless autocast asks for bf16.
The autograd pieces are in nanochat/ops.py; what each keeps for backward is in docs/memory.md.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from nanochat.ops import (LOSS_CHUNK_ROWS, apply_rotary, chunked_softcap_cross_entropy, compute_dtype, norm,
                          relu_squared_linear, rotary_tables, softcap_logits)
from nanochat.sampling import sample_next_token
from nanochat.molegrad import (
    MOLEGRAD_MOMENTA,
    MOLEGRAD_TARGET_LINEARS,
    MOLEGRAD_TARGETS,
    MoleGradLinear,
    check_options,
    molegrad_layers,
    molegrad_mlp,
    statistics_paused,
)

if TYPE_CHECKING:
    from nanochat.engine import KVCache

RECOMPUTE_MODES = ("none", "mlp", "block")
BLOCK_LINEARS = MOLEGRAD_TARGET_LINEARS["all"]  # every Linear of a block, by name
# Up to this many tokens per forward (decoding), the LM head runs as (vocab, d) @ (d, tokens).
DECODE_ROWS = 64
# The rotary table covers this many times sequence_len, so sampling can run past the training context.
ROTARY_LENGTH_FACTOR = 10
# Training attention on CUDA runs in one of these SDPA kernels, in this order, or fails: the math
# kernel would keep (B, H, T, T) per layer, which no memory plan counts; cuDNN attention has other
# workspaces and determinism than the two the planner was built on. Flash needs sm80+ and 16-bit
# inputs; the memory-efficient kernel takes fp32 everywhere and bf16 only on sm80+.
TRAINING_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
# GPTConfig's recipe pieces (each adds parameters; transformers' NanoChat has none of them)
RECIPE_PIECES = ("layer_lambdas", "smear_gate", "backout", "value_embeds")
SMEAR_GATE_CHANNELS = 24  # input channels of the smear gate and of each value-embedding gate (as upstream)
VE_GATE_CHANNELS = 12


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
    molegrad_rank_k: int = 0  # MoleGrad rank k; 0 = off (dense weight gradients)
    molegrad_targets: str = "ffn_only"  # ffn_only | attn_only | all
    molegrad_power_iters: int = 1
    molegrad_warm_start_decay: float = 0.95
    molegrad_momentum: str = "dense"  # dense | lowrank: Muon's momentum for MoleGrad matrices
    molegrad_keep_h: bool = False  # a MoleGrad MLP keeps h for backward instead of recomputing it
    molegrad_subspace: str = "principal"  # principal | unbiased | gradient: what Q spans (nanochat/molegrad.py)
    # recipe pieces (upstream nanochat, 2026), all off by default; off, the model is the one above
    layer_lambdas: bool = False  # per-layer learnable x <- resid_lambdas[i] x + x0_lambdas[i] x0 before block i
    smear_gate: bool = False  # mix the previous token's embedding into each position through a learned gate
    backout: bool = False  # subtract backout_lambda x (the residual after block n_layer // 2) before the final norm
    value_embeds: bool = False  # per-token value embeddings added to v, gated per kv head, on alternating layers

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
        check_memory_options(self.memory_options(), self.n_embd)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def molegrad(self) -> bool:
        """Whether the model has MoleGrad layers (molegrad_rank_k > 0)."""
        return self.molegrad_rank_k > 0

    def memory_options(self) -> dict[str, Any]:
        """The memory fields (MEMORY_OPTIONS) and their values."""
        return {name: getattr(self, name) for name in MEMORY_OPTIONS}

    def recipe_pieces(self) -> list[str]:
        """The names of the recipe pieces (RECIPE_PIECES) that are on."""
        return [name for name in RECIPE_PIECES if getattr(self, name)]


# GPTConfig's memory fields: how the model trains within memory, not what it computes
MEMORY_OPTIONS = ("recompute", "molegrad_rank_k", "molegrad_targets", "molegrad_power_iters",
                  "molegrad_warm_start_decay", "molegrad_momentum", "molegrad_keep_h", "molegrad_subspace")


def check_memory_options(options: dict[str, Any], n_embd: int | None = None) -> None:
    """The value checks of GPTConfig's memory fields (`options`: some or all of MEMORY_OPTIONS,
    the rest at their defaults), in one place: a ValueError names the field, "molegrad_rank_k=40:
    expected ...". n_embd None (the width is not known yet): k's upper bound is not checked."""
    o = {name: GPTConfig.__dataclass_fields__[name].default for name in MEMORY_OPTIONS} | options
    if o["recompute"] not in RECOMPUTE_MODES:
        raise ValueError(f"recompute={o['recompute']!r}: expected one of {'|'.join(RECOMPUTE_MODES)}")
    if o["molegrad_targets"] not in MOLEGRAD_TARGETS:
        raise ValueError(f"molegrad_targets={o['molegrad_targets']!r}: expected one of {'|'.join(MOLEGRAD_TARGETS)}")
    if o["molegrad_momentum"] not in MOLEGRAD_MOMENTA:
        raise ValueError(f"molegrad_momentum={o['molegrad_momentum']!r}: expected one of {'|'.join(MOLEGRAD_MOMENTA)}")
    rank = o["molegrad_rank_k"]
    if rank < 0:
        raise ValueError(f"molegrad_rank_k={rank}: expected >= 0 (0 = MoleGrad off)")
    # every target set holds Linears whose input is the model width (c_q, c_k, c_v, c_fc); with MoleGrad
    # off only the other options are checked (rank 1 stands in)
    check_options(rank or 1, o["molegrad_power_iters"], o["molegrad_warm_start_decay"], n_embd if rank else None,
                  prefix="molegrad_", subspace=o["molegrad_subspace"] if rank else "principal")
    if rank == 0 and o["molegrad_momentum"] != "dense":
        raise ValueError(f"molegrad_momentum={o['molegrad_momentum']}: low-rank momentum needs MoleGrad on")
    if rank == 0 and o["molegrad_subspace"] != "principal":
        raise ValueError(f"molegrad_subspace={o['molegrad_subspace']}: needs MoleGrad on")
    if o["molegrad_keep_h"] and not (rank > 0 and "mlp.c_fc" in MOLEGRAD_TARGET_LINEARS[o["molegrad_targets"]]):
        raise ValueError(f"molegrad_keep_h=True: needs MoleGrad on the MLP (targets ffn_only|ffn_v|all), got "
                         f"{'MoleGrad off' if rank == 0 else 'targets ' + o['molegrad_targets']}")


# model_config keys of checkpoints saved before MoleGrad's options were named molegrad_*
LEGACY_CONFIG_KEYS = {"streaming_rank_k": "molegrad_rank_k", "streaming_targets": "molegrad_targets",
                      "streaming_power_iters": "molegrad_power_iters",
                      "streaming_warm_start_decay": "molegrad_warm_start_decay",
                      "streaming_momentum": "molegrad_momentum", "streaming_keep_h": "molegrad_keep_h"}


def config_from_dict(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved model_config (checkpoint metadata) with today's field names."""
    return {LEGACY_CONFIG_KEYS.get(name, name): value for name, value in saved.items()}


def has_value_embed(config: GPTConfig, layer_idx: int) -> bool:
    """Value embeddings sit on alternating layers, the last one always among them (as upstream)."""
    return config.value_embeds and layer_idx % 2 == (config.n_layer - 1) % 2


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
    `options` are the remaining GPTConfig fields (softcap, recompute, molegrad_*, recipe pieces).
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
# the transformer

class Linear(nn.Linear):
    """nn.Linear without bias that computes in its input's dtype: a bf16 weight serves an fp32
    forward by a cast per call (as MoleGradLinear and the LM head do), instead of turning the
    matmul into a bf16 one. Under autocast the input is already in autocast's dtype."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


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
        # value embeddings: a gate per kv head from the first few channels of the normed input
        self.ve_gate = (Linear(min(VE_GATE_CHANNELS, config.n_embd), self.n_kv_head)
                        if has_value_embed(config, layer_idx) else None)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None = None,
                ve: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        xn = norm(x, compute_dtype(x.device.type, x.dtype))  # one cast for c_q, c_k, c_v, not three
        q = self.c_q(xn).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(xn).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(xn).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # ResFormer-style value residual: v + gate (0..3, per kv head) x value embedding
            gate = 3 * torch.sigmoid(self.ve_gate(xn[..., :self.ve_gate.in_features]))  # (B, T, H_kv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        # QK norm after rotary (as nanochat). The two commute up to rounding: rotary rotates pairs of
        # channels, which keeps the RMS over head_dim. Norming last feeds SDPA unit-RMS q and k.
        q = norm(apply_rotary(q, cos, sin))
        k = norm(apply_rotary(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        gqa = self.n_kv_head != self.n_head
        if kv_cache is None:
            y = causal_attention(q, k, v, gqa)
        else:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)  # (B, H_kv, T_past + T, D)
            prefix = k.size(2) - T
            if kv_cache.attn_mask is not None:  # rows at different positions: each sees its own past
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_cache.attn_mask, enable_gqa=gqa)
            elif prefix == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            elif T == 1:  # one new token sees the whole cache
                y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            else:  # new token i sees the prefix and new tokens 0..i: is_causal would align to the top-left
                visible = torch.ones(T, prefix + T, dtype=torch.bool, device=q.device).tril_(diagonal=prefix)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, H * D)
        return self.c_proj(y)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
    """Causal SDPA of q (B, H, T, D), k, v (B, H_kv, T, D); when training on CUDA, only in a flash or
    memory-efficient kernel (TRAINING_SDPA_BACKENDS), else one line saying why."""
    if not (q.is_cuda and torch.is_grad_enabled() and q.requires_grad):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if torch.compiler.is_compiling():
        with sdpa_kernel(TRAINING_SDPA_BACKENDS, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    try:
        with sdpa_kernel(TRAINING_SDPA_BACKENDS, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    except RuntimeError as e:
        major, minor = torch.cuda.get_device_capability(q.device)
        raise RuntimeError(f"attention: no flash/memory-efficient SDPA kernel for q {tuple(q.shape)} {q.dtype} "
                           f"(head_dim {q.size(-1)}) on a capability {major}.{minor} GPU in training; the math "
                           f"kernel would keep (B, H, T, T) per layer: bf16 needs capability 8.0+ (else "
                           f"--dtype=float32), head_dim at most 256") from e


def training_attention_backend(device: torch.device, dtype: torch.dtype, n_head: int, head_dim: int,
                               seq_len: int) -> str:
    """The SDPA kernel training attention picks for these shapes ("FLASH_ATTENTION", ...), as
    printed once at the start of a CUDA run; "none" when neither allowed kernel takes them."""
    q = torch.empty(1, n_head, seq_len, head_dim, device=device, dtype=dtype, requires_grad=True)
    if not q.is_cuda:
        return SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=True)).name
    with sdpa_kernel(TRAINING_SDPA_BACKENDS, set_priority=True):
        choice = SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=True))
    return choice.name if choice in TRAINING_SDPA_BACKENDS else "none"


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int, linear: LinearFactory) -> None:
        super().__init__()
        self.c_fc = linear(config.n_embd, 4 * config.n_embd, layer_idx, "mlp.c_fc")
        self.c_proj = linear(4 * config.n_embd, config.n_embd, layer_idx, "mlp.c_proj")
        if isinstance(self.c_fc, MoleGradLinear) != isinstance(self.c_proj, MoleGradLinear):
            raise ValueError("MLP: MoleGrad compresses both MLP Linears or neither (c_proj's input is relu²(h), "
                             "kept only if h is recomputed)")
        self.compressed = isinstance(self.c_fc, MoleGradLinear)
        # inside a recompute, h's saved copy lives only for that block's backward: keep it
        self.keep_h = config.molegrad_keep_h or config.recompute != "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xn = norm(x, compute_dtype(x.device.type, x.dtype))  # (B, T, d), kept by the norm for its backward
        if self.compressed:
            return molegrad_mlp(xn, self.c_fc, self.c_proj, self.keep_h)  # keeps xn (or h), xn Q1, relu²(h) Q2
        return relu_squared_linear(self.c_fc(xn), self.c_proj.weight)  # keeps xn, h


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int, linear: LinearFactory) -> None:
        super().__init__()
        self.recompute = config.recompute
        self.attn = CausalSelfAttention(config, layer_idx, linear)
        self.mlp = MLP(config, layer_idx, linear)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None = None,
                ve: torch.Tensor | None = None) -> torch.Tensor:
        if self.recompute == "block" and kv_cache is None:
            return self._recomputed(self, self._forward, x, cos, sin, None, ve)
        return self._forward(x, cos, sin, kv_cache, ve)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None = None,
                 ve: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(x, cos, sin, kv_cache, ve)
        if self.recompute == "mlp" and kv_cache is None:
            return x + self._recomputed(self.mlp, self.mlp, x)
        return x + self.mlp(x)

    @staticmethod
    def _recomputed(region: nn.Module, fn: Callable[..., torch.Tensor], *args: torch.Tensor | None) -> torch.Tensor:
        """fn(*args) rerun in backward (torch.utils.checkpoint); the rerun takes no MoleGrad
        statistics. Compiled, the partitioner recomputes only what backward needs, which never
        includes the statistics, so the default context is right there."""
        if torch.compiler.is_compiling():
            return checkpoint(fn, *args, use_reentrant=False)
        return checkpoint(fn, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), statistics_paused(region)))


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
        self.lm_head = Linear(config.n_embd, config.vocab_size)
        # recipe pieces: attributes are None when off (no parameters, nothing in the state dict)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer)) if config.layer_lambdas else None
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer)) if config.layer_lambdas else None
        self.smear_gate = Linear(min(SMEAR_GATE_CHANNELS, config.n_embd), 1) if config.smear_gate else None
        self.smear_lambda = nn.Parameter(torch.zeros(1)) if config.smear_gate else None
        self.backout_lambda = nn.Parameter(torch.zeros(1)) if config.backout else None
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, config.n_kv_head * config.head_dim)
            for i in range(config.n_layer) if has_value_embed(config, i)}) if config.value_embeds else None
        self.loss_chunk_rows = LOSS_CHUNK_ROWS
        # Non-persistent: not in checkpoints, recomputed here, in init_weights and after load_state_dict.
        self.rotary_seq_len = config.sequence_len * ROTARY_LENGTH_FACTOR
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.register_load_state_dict_post_hook(_recompute_rotary_after_load)
        if self.lm_head.weight.is_meta:  # no values to set (init_weights() runs after to_empty()): shapes only
            self._init_rotary()
        else:
            self.init_weights()

    def _linear(self, in_features: int, out_features: int, layer_idx: int, name: str) -> nn.Module:
        """Every Linear of the blocks is made here; name is one of BLOCK_LINEARS ("mlp.c_fc", ...).

        MoleGrad's targets are MoleGradLinears; each gets its own seed, layer_idx * 6 + the
        name's index, so that the subspaces start different and every process builds the same.
        """
        if name not in BLOCK_LINEARS:
            raise ValueError(f"name: expected one of {'|'.join(BLOCK_LINEARS)}, got {name!r}")
        cfg = self.config
        if cfg.molegrad and name in MOLEGRAD_TARGET_LINEARS[cfg.molegrad_targets]:
            return MoleGradLinear(in_features, out_features, rank_k=cfg.molegrad_rank_k,
                                   power_iters=cfg.molegrad_power_iters,
                                   warm_start_decay=cfg.molegrad_warm_start_decay,
                                   seed=layer_idx * len(BLOCK_LINEARS) + BLOCK_LINEARS.index(name),
                                   subspace=cfg.molegrad_subspace)
        return Linear(in_features, out_features)

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
        - Recipe pieces (after everything above, so that turning one on leaves the other draws
          alone), as upstream: resid_lambdas 1.15 -> 1.05 and x0_lambdas 0.20 -> 0.05 over depth,
          smear_lambda 0, smear gate and value-embedding gates ~ U(0, 0.02) (gates start slightly
          open), backout_lambda 0.2, value embeddings ~ U(±sqrt(3 / n_embd)) like c_v.
        """
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                bound = math.sqrt(3.0 / linear.weight.size(1))
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self._init_recipe_pieces()
        for layer in molegrad_layers(self):
            layer.reset_subspace()
        self._init_rotary()

    @torch.no_grad()
    def _init_recipe_pieces(self) -> None:
        depth_frac = torch.arange(self.config.n_layer, dtype=torch.float64) / max(self.config.n_layer - 1, 1)
        if self.resid_lambdas is not None:
            self.resid_lambdas.copy_(1.15 - 0.10 * depth_frac)
            self.x0_lambdas.copy_(0.20 - 0.15 * depth_frac)
        if self.smear_gate is not None:
            nn.init.zeros_(self.smear_lambda)
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        if self.backout_lambda is not None:
            nn.init.constant_(self.backout_lambda, 0.2)
        if self.value_embeds is not None:
            bound = math.sqrt(3.0 / self.config.n_embd)
            for embedding in self.value_embeds.values():
                nn.init.uniform_(embedding.weight, -bound, bound)
            for block in self.transformer.h:
                if block.attn.ve_gate is not None:
                    nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)

    def stream_dtype(self, device_type: str) -> torch.dtype:
        """The residual stream's dtype: the weights', but at least float32 on a CPU, whose bf16
        matmuls are emulated in software unless it has AMX or AVX-512 BF16, and there the scripts
        compute under bf16 autocast, which sets the matmuls' dtype anyway. So bf16 weights
        (--param_dtype=bfloat16) train at fp32's speed on any CPU (python -m bench.memory_modes
        --arms=dense,bf16_weights). On CUDA bf16 weights compute in bf16, autocast or not (an
        inference model is cast to bf16 to decode in bf16)."""
        weights = self.lm_head.weight.dtype
        return torch.promote_types(weights, torch.float32) if device_type == "cpu" else weights

    def num_params(self) -> int:
        """All parameters, embedding included."""
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 per non-embedding parameter (forward 2, backward 4; the
        embedding is a lookup) plus attention's QKᵀ and AV, counted causally as the kernels compute
        them: query t sees t + 1 keys, (T + 1) / 2 on average, so 12 * n_layer * n_head * head_dim *
        (T + 1) / 2, about half of the full T x T matrix that nanochat counts (which reads ~1.36x
        higher MFU at depth 12 x 8192 tokens)."""
        cfg = self.config
        non_embedding = self.num_params() - self.transformer.wte.weight.numel()
        if self.value_embeds is not None:  # lookups too
            non_embedding -= sum(p.numel() for p in self.value_embeds.parameters())
        attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * (cfg.sequence_len + 1) / 2
        return float(6 * non_embedding + attention)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                loss_reduction: str = "mean") -> torch.Tensor:
        """idx (B, T) token ids. With targets (B, T) (-1 = ignored): the loss, a scalar for
        reduction mean/sum, (B, T) for "none". Without: softcapped logits (B, T, vocab) in float32
        (or the model's dtype if wider). With kv_cache, idx holds only the new tokens, placed
        after each row's current position in the cache."""
        B, T = idx.shape
        start = 0 if kv_cache is None else kv_cache.get_pos()
        if start + T > self.rotary_seq_len:
            raise ValueError(f"sequence too long: positions up to {start + T} but the rotary table covers "
                             f"{self.rotary_seq_len} (= {ROTARY_LENGTH_FACTOR} x sequence_len)")
        stream_dtype = self.stream_dtype(idx.device.type)
        dtype = compute_dtype(idx.device.type, stream_dtype)  # the matmuls'
        positions = None if kv_cache is None else kv_cache.positions(T)  # (B, T) when the cache's rows differ
        if positions is None:
            cos, sin = self.cos[start:start + T].to(dtype), self.sin[start:start + T].to(dtype)  # (T, 1, head_dim)
        else:
            cos, sin = self.cos[positions].to(dtype), self.sin[positions].to(dtype)  # (B, T, 1, head_dim)
        x = norm(self.transformer.wte(idx).to(stream_dtype))  # (B, T, d)
        if self.config.recipe_pieces():
            x = self._recipe_trunk(idx, x, cos, sin, kv_cache)
        else:
            for block in self.transformer.h:
                x = block(x, cos, sin, kv_cache)
        x = norm(x, dtype)  # (B, T, d) in the compute dtype
        if targets is None:
            weight, rows = self.lm_head.weight.to(dtype), x.view(B * T, -1)
            if B * T <= DECODE_ROWS:  # (vocab, d) @ (d, N): F.linear's (N, d) @ (d, vocab) took 2.2x longer on CPU at N = 8
                logits = (weight @ rows.T).T.contiguous()
            else:
                logits = F.linear(rows, weight)
            return softcap_logits(logits.to(torch.promote_types(dtype, torch.float32)), self.config.softcap).view(B, T, -1)
        loss = chunked_softcap_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(B * T),
                                             self.config.softcap, loss_reduction, self.loss_chunk_rows)
        return loss.view(B, T) if loss_reduction == "none" else loss

    def _recipe_trunk(self, idx: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      kv_cache: KVCache | None) -> torch.Tensor:
        """The blocks with the recipe pieces that are on; x (B, T, d) is the normed embedding."""
        if self.smear_gate is not None:
            x = self._smear(x, kv_cache)
        x0 = x
        backout_layer, x_backout = self.config.n_layer // 2, None
        for i, block in enumerate(self.transformer.h):
            if self.resid_lambdas is not None:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = (self.value_embeds[str(i)](idx).to(x.dtype) if self.value_embeds is not None and str(i) in self.value_embeds
                  else None)
            x = block(x, cos, sin, kv_cache, ve)
            if i == backout_layer:
                x_backout = x
        if self.backout_lambda is not None:
            x = x - self.backout_lambda * x_backout
        return x

    def _smear(self, x: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        """Position t of x (B, T, d) gets smear_lambda * sigmoid(gate(x_t[:24])) * x_{t-1} added; the
        first position of a sequence gets nothing. With a KV cache, x_{t-1} of the first new
        token is the last embedding of the previous forward (kv_cache.prev_embedding)."""
        previous = x[:, :-1]  # (B, T - 1, d)
        if kv_cache is not None:
            carried, kv_cache.prev_embedding = kv_cache.prev_embedding, x[:, -1:]
            if carried is not None:
                previous = torch.cat((carried.to(x.dtype), previous), dim=1)  # (B, T, d)
        start = x.size(1) - previous.size(1)  # 1 at the start of a sequence, else 0
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[:, start:, :self.smear_gate.in_features]))
        return torch.cat((x[:, :start], x[:, start:] + gate * previous), dim=1)

    @torch.inference_mode()
    def generate(self, tokens: list[int], max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42) -> list[int]:
        """The next `max_tokens` tokens after `tokens`, sampled one at a time with a full forward
        over the whole sequence (no KV cache): the slow, obvious reference for the Engine."""
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
