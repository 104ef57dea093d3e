"""Peak training memory: predicted by component from the model itself, checked against measured steps.

    python -m nanochat.memory --depth=12 --max_seq_len=8192 --device_batch_size=1 --molegrad=True \\
        --molegrad_rank_k=32 --molegrad_targets=ffn_only --gpu_memory=32GB --require_fit=True
    python -m nanochat.memory --depth=4 --max_seq_len=1024 --device_batch_size=4 --vocab_size=8192 --measure=True
    python -m nanochat.memory --depth=40 --memory_mode=lowest --gpu_memory=24GB --require_fit=True
    python -m nanochat.memory --depth=40 --memory_mode=standard --gpu_memory=24GB   # bf16 weights, 8-bit states
    python -m nanochat.memory --sweep_depths=True      # the deepest model that fits, per memory setting
    python -m nanochat.memory --sweep_depths=True --value_embeds=True   # ... and what value embeddings cost

`plan_memory(config, batch_size, dtype, grad_accum_steps, device_type, **precision)` gives the bytes
of each component of a training step (parameters, optimizer state, gradients, MoleGrad's buffers,
activations, transients) and of its three largest moments (the end of forward, the start of
backward, the optimizer step): the peak is the largest. precision: the weights', the gradients' and
the optimizer states' dtypes (--param_dtype, --grad_dtype, --optim_state; nanochat/precision.py).
What the model and its optimizers hold (each Linear's (out, in), which are
MoleGrad layers, parameter counts, AdamW's tensors and Muon's matrices) is read off GPT(config) built
on the meta device with base_train's optimizers (`read_model`); only what autograd saves and the
transients are formulas, in d = width, L = blocks, V = vocabulary, N = tokens of a micro-batch,
k = MoleGrad's rank, checked against saved-tensor hooks and measured peaks (nanochat/memory_measure.py,
tests/test_memory.py). Each component, and how close the plan comes to the measured peak:
docs/memory.md.
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from nanochat.common import cpu_has_native_bf16
from nanochat.config import check, parse_args
from nanochat.gpt import BLOCK_LINEARS, GPT, RECIPE_PIECES, ROTARY_LENGTH_FACTOR, GPTConfig, config_from_depth
from nanochat.memory_measure import measure_allocated_peak, measure_peak
from nanochat.model_flags import MEMORY_SETTINGS, PRACTITIONER_PRECISION, ModelFlags, flag_errors
from nanochat.molegrad import MOLEGRAD_TARGET_LINEARS, MoleGradLinear, molegrad_layers
from nanochat.ops import LOSS_CHUNK_ROWS
from nanochat.optim import setup_optimizers
from nanochat.precision import MIN_QUANTIZED_NUMEL, OPTIM_STATES, QUANT_BLOCK, SPAN, check_precision_options

# --dtype: the compute dtype, spelled as every other entry point; --param_dtype: the weights'
ITEMSIZE = {"bfloat16": 2, "float32": 4}
FP32 = 4    # default weights, gradients and optimizer states; norm scales, SDPA's logsumexp
INT64 = 8   # token ids
GiB = 2**30
MiB = 2**20
# exit status of --require_fit when the plan does not fit
DOES_NOT_FIT = 3


# ---------------------------------------------------------------------------------------------
# the model's facts: read off the model and its optimizers

@dataclass(frozen=True)
class ModelFacts:
    """What a training step's memory depends on that the model and its optimizers hold (read_model).
    Sizes are elements of fp32 tensors unless named bytes."""

    linears: dict[str, tuple[int, int]]  # (out, in) of each Linear of a block, by name (gpt.BLOCK_LINEARS)
    molegrad: dict[str, tuple[int, int]]  # those that are MoleGrad layers: (rank k, scout directions e)
    embedding: int                       # wte: vocab x d
    head: int                            # lm_head: vocab x d
    ve_gate: tuple[int, int] | None      # (out, in) of a carrying block's value-embedding gate
    smear_channels: int                  # the smear gate's input channels (0: no smear gate)
    rotary_bytes: int                    # the cos and sin tables
    adamw_largest: int                   # AdamW's largest tensor
    dense_matrix_largest: tuple[int, int]  # Muon's largest matrix with a dense gradient ((0, 0): none)
    molegrad_largest: tuple[int, int]    # Muon's largest MoleGrad matrix ((0, 0): none)
    # sums over the whole model (ADDITIVE)
    params: int                          # every parameter
    adamw: int                           # AdamW's parameters: embedding, head, recipe pieces
    adamw_tensors: int                   # ... as tensors (a step count each)
    muon: int                            # Muon's matrices: the blocks' Linears and value-embedding gates
    molegrad_weights: int                # the weights of the MoleGrad layers (Muon matrices without p.grad)
    molegrad_factors: int                # their factor gradients, (out, k) each
    molegrad_probes: int                 # the gradient subspace's probe images, (in, t) each (0 for the other subspaces)
    molegrad_buffer_bytes: int           # the buffers of every MoleGrad layer (subspace, statistics, gradient sink)
    value_embeds: int                    # blocks that carry a value-embedding table
    # bytes of one 8-bit optimizer state (state_bytes) summed over: AdamW's tensors; Muon's momentum,
    # dense (out, in) per matrix, and low-rank ((out, k) per MoleGrad matrix)
    adamw_int8_bytes: int
    muon_int8_bytes: int
    muon_lowrank_int8_bytes: int

    @property
    def dense_block(self) -> int:
        """Elements of one block's dense (not MoleGrad) Linears."""
        return sum(out * inp for name, (out, inp) in self.linears.items() if name not in self.molegrad)


ADDITIVE = ("params", "adamw", "adamw_tensors", "muon", "molegrad_weights", "molegrad_factors", "molegrad_probes",
            "molegrad_buffer_bytes", "value_embeds", "adamw_int8_bytes", "muon_int8_bytes", "muon_lowrank_int8_bytes")


def read_model(config: GPTConfig) -> ModelFacts:
    """The ModelFacts of GPT(config) with base_train's optimizers (setup_optimizers), built on the
    meta device: shapes without memory or values.

    Building every block of a deep model costs seconds per sweep, and the blocks repeat with
    period two (value embeddings sit on every second block, counted from the last): every sum is
    affine in n_layer at a fixed parity. So the model is built at the two smallest depths of
    n_layer's parity, p (1 or 2) and p + 2, and its sums extended to n_layer from them
    (tests/test_memory.py checks this against the whole model)."""
    smallest = 2 - config.n_layer % 2
    small, large = built_model_facts(config, smallest), built_model_facts(config, smallest + 2)
    blocks = (config.n_layer - smallest) // 2  # pairs of blocks beyond the smallest model
    return replace(small, **{name: getattr(small, name) + blocks * (getattr(large, name) - getattr(small, name))
                             for name in ADDITIVE})


def built_model_facts(config: GPTConfig, n_layer: int) -> ModelFacts:
    """ModelFacts of GPT(config) at n_layer blocks. Recompute and keep_h change how forward runs and
    molegrad_momentum what Muon's step keeps (plan_memory), not what the model and its optimizers'
    groups hold: models that differ only there share one build (cached)."""
    built = dict(n_layer=n_layer, recompute="none", molegrad_keep_h=False, molegrad_momentum="dense")
    return _built_model_facts(tuple(built.get(f.name, getattr(config, f.name)) for f in fields(GPTConfig)))


@functools.lru_cache(maxsize=4096)
def _built_model_facts(values: tuple) -> ModelFacts:
    with torch.device("meta"):
        model = GPT(GPTConfig(*values))
    adamw, muon = setup_optimizers(model)  # AdamW: embedding, head, recipe pieces; Muon: the blocks' matrices
    block = model.transformer.h[-1]  # the last block carries a value embedding if any does
    modules = {name: block.get_submodule(name) for name in BLOCK_LINEARS}
    adamw_params = [p for group in adamw.param_groups for p in group["params"]]
    muon_params = [p for group in muon.param_groups for p in group["params"]]
    layers = molegrad_layers(model)  # Muon matrices whose gradient is a factor
    molegrad_ids = {id(layer.weight): layer for layer in layers}
    dense_matrices = [p for p in muon_params if id(p) not in molegrad_ids]
    lowrank_momenta = [molegrad_ids[id(p)].grad_sink.numel() if id(p) in molegrad_ids else p.numel() for p in muon_params]
    return ModelFacts(
        linears={name: tuple(module.weight.shape) for name, module in modules.items()},
        molegrad={name: (module.rank_k, module.explore_k) for name, module in modules.items()
                  if isinstance(module, MoleGradLinear)},
        embedding=model.transformer.wte.weight.numel(),
        head=model.lm_head.weight.numel(),
        ve_gate=tuple(block.attn.ve_gate.weight.shape) if block.attn.ve_gate is not None else None,
        smear_channels=model.smear_gate.in_features if model.smear_gate is not None else 0,
        rotary_bytes=sum(t.numel() * t.element_size() for t in (model.cos, model.sin)),
        adamw_largest=max(p.numel() for p in adamw_params),
        dense_matrix_largest=tuple(max(dense_matrices, key=torch.Tensor.numel).shape) if dense_matrices else (0, 0),
        molegrad_largest=tuple(max((layer.weight for layer in layers), key=torch.Tensor.numel).shape) if layers else (0, 0),
        params=sum(p.numel() for p in model.parameters()),
        adamw=sum(p.numel() for p in adamw_params),
        adamw_tensors=len(adamw_params),
        muon=sum(p.numel() for p in muon_params),
        molegrad_weights=sum(layer.weight.numel() for layer in layers),
        molegrad_factors=sum(layer.grad_sink.numel() for layer in layers),  # the factor's home, (out, k)
        molegrad_probes=sum(layer.probe_sink.numel() for layer in layers if layer.probe_sink is not None),
        molegrad_buffer_bytes=sum(b.numel() * b.element_size() for layer in layers for b in layer.buffers()),
        value_embeds=len(model.value_embeds) if model.value_embeds is not None else 0,
        adamw_int8_bytes=sum(state_bytes(p.numel(), "int8") for p in adamw_params),
        muon_int8_bytes=sum(state_bytes(p.numel(), "int8") for p in muon_params),
        muon_lowrank_int8_bytes=sum(state_bytes(numel, "int8") for numel in lowrank_momenta),
    )


def state_bytes(numel: int, optim_state: str) -> int:
    """Bytes of one optimizer state (a momentum, a moment) of a tensor of `numel` values
    (precision.OptimizerStates): fp32, or 8-bit codes rounded up to whole blocks of QUANT_BLOCK
    values with an fp32 scale per block; tensors under MIN_QUANTIZED_NUMEL values keep fp32."""
    if optim_state == "float32" or numel < MIN_QUANTIZED_NUMEL:
        return FP32 * numel
    blocks = -(-numel // QUANT_BLOCK)
    return blocks * (QUANT_BLOCK + FP32)


# ---------------------------------------------------------------------------------------------
# activations: what autograd saves

ATTENTION_LINEARS = MOLEGRAD_TARGET_LINEARS["attn_only"]  # c_q, c_k, c_v, c_proj


@functools.lru_cache(maxsize=None)
def stream_value_bytes(param_dtype: str, device_type: str) -> int:
    """Bytes of a residual-stream value with `param_dtype` weights on `device_type`: GPT.stream_dtype,
    asked of a one-block model on the meta device (the weights', but at least fp32 on a CPU)."""
    with torch.device("meta"):
        model = GPT(config_from_depth(1, 2, 2)).to(getattr(torch, param_dtype))
    return model.stream_dtype(device_type).itemsize


def block_saved_bytes_per_token(config: GPTConfig, itemsize: int, stream_itemsize: int = FP32) -> int:
    """Bytes one block saves for backward per token (docs/memory.md; measured by tests). itemsize:
    the compute dtype's; stream_itemsize: the residual stream's (stream_value_bytes())."""
    d, k = config.n_embd, config.molegrad_rank_k
    if config.recompute == "block":
        return stream_itemsize * d  # the block's input, kept by the checkpoint
    compressed = read_model(config).molegrad
    # normed x, q, attention output (d each), k, v; norm scales of x, q and k; SDPA's logsumexp
    attention = itemsize * (3 * d + 2 * config.n_kv_head * config.head_dim)
    attention += FP32 * (1 + 2 * config.n_head + config.n_kv_head)
    # x Q of each compressed attention Linear; their inputs are kept anyway (the gradient subspace's too)
    attention += k * itemsize * sum(name in compressed for name in ATTENTION_LINEARS)
    if config.recompute == "mlp":
        mlp = stream_itemsize * d  # the MLP's input, kept by the checkpoint
    elif "mlp.c_fc" in compressed:
        mlp = itemsize * (d + 2 * k) + FP32  # normed x, x Q1, relu²(h) Q2, the norm's scale
        if config.molegrad_keep_h:
            mlp += itemsize * 4 * d  # h, kept instead of recomputed
    else:
        mlp = itemsize * 5 * d + FP32  # normed x and h (4d), the norm's scale
    return attention + mlp


def autocast_weight_names(config: GPTConfig) -> tuple[str, ...]:
    """Dense Linears whose weight F.linear casts to bf16 under autocast (cached until forward ends);
    the dense MLP's c_proj is cast inside ReLUSquaredLinear instead, and MoleGrad layers cast their
    weight where they use it: both transiently."""
    facts = read_model(config)
    return tuple(name for name in facts.linears if name != "mlp.c_proj" and name not in facts.molegrad)


def block_saved_weight_bytes(config: GPTConfig, itemsize: int, param_itemsize: int = FP32) -> int:
    """Bytes of the weight copies in the compute dtype that one block saves for backward (0 when the
    weights are in the compute dtype): those of its dense Linears outside a recomputed region
    (MoleGrad layers save the weight itself, the parameter). Copies are bf16 ones of fp32 weights
    under autocast, or fp32 ones of bf16 weights computing in fp32 (a CPU: GPT.stream_dtype)."""
    if itemsize == param_itemsize or config.recompute == "block":
        return 0
    facts = read_model(config)
    compressed, shapes = facts.molegrad, facts.linears
    saved = [name for name in ATTENTION_LINEARS if name not in compressed]
    if config.recompute == "none" and "mlp.c_fc" not in compressed:
        saved.append("mlp.c_fc")
    return itemsize * sum(shapes[name][0] * shapes[name][1] for name in saved)


def value_embed_saved_bytes_per_token(config: GPTConfig, itemsize: int, stream_itemsize: int = FP32) -> int:
    """Bytes a carrying block saves per token for its value embedding (measured by tests): the
    looked-up row VE_i[token] (kv_dim, cast to the residual stream's dtype; not autocast), kept by the
    product gate x ve or, under recompute=block, by the checkpoint as the block's input; without block
    recompute also sigmoid(gate) and 3 sigmoid(gate) (n_kv_head each, compute dtype). The gate's
    input is a slice of the normed x that attention keeps anyway."""
    if not config.value_embeds:
        return 0
    row = stream_itemsize * config.n_kv_head * config.head_dim
    return row if config.recompute == "block" else row + 2 * itemsize * config.n_kv_head


def value_embed_saved_weight_bytes(config: GPTConfig, itemsize: int, param_itemsize: int = FP32) -> int:
    """The copy in the compute dtype of a carrying block's gate weight that its backward keeps (0 when
    the weights are in the compute dtype, and under block recompute)."""
    if not config.value_embeds or itemsize == param_itemsize or config.recompute == "block":
        return 0
    out, inp = read_model(config).ve_gate
    return itemsize * out * inp


def recipe_saved_bytes(config: GPTConfig, batch_size: int, itemsize: int, stream_itemsize: int = FP32,
                       param_itemsize: int = FP32) -> int:
    """Bytes the recipe pieces save outside the blocks (value embeddings: inside, see
    value_embed_saved_bytes_per_token), for batch_size x sequence_len tokens (measured by tests);
    itemsize, stream_itemsize, param_itemsize: the compute dtype's, the residual stream's, the weights':
    - layer_lambdas: resid_lambdas[i] x keeps x, the output of block i-1 (N x d, i >= 1), which
      no norm keeps (norms keep their output); x0_lambdas[i] x0 keeps x0, new when smeared.
    - smear_gate: per position 1..T-1 the gate's input x[:24] (a copy: the slice is cast under
      autocast, or cannot be flattened for batch > 1), sigmoid (compute dtype) and
      smear_lambda x sigmoid (the wider of the weights' and the compute dtype); the gate weight's copy
      in the compute dtype, unless weights, stream and compute share a dtype (the gate casts its
      weight to its input's, the stream's, and autocast that to bf16).
    - recompute=block: block 0's checkpoint keeps its input, no longer the normed embedding
      (activations: embedding) when smeared or lambda-mixed.
    - backout: backout_lambda x_mid keeps x_mid, the output of block n_layer // 2, unless block
      n_layer // 2 + 1 keeps it already (its lambda product, or its checkpoint)."""
    d, L, T = config.n_embd, config.n_layer, config.sequence_len
    N = batch_size * T
    size = 0
    stream = stream_itemsize * N * d  # one residual-stream tensor
    if config.layer_lambdas:
        size += (L - 1) * stream + (stream if config.smear_gate else 0)
    if config.smear_gate:
        rows, channels = batch_size * (T - 1), read_model(config).smear_channels
        copied = itemsize != stream_itemsize or batch_size > 1
        size += rows * ((itemsize * channels if copied else 0) + itemsize + max(itemsize, param_itemsize))
        size += itemsize * channels if not itemsize == stream_itemsize == param_itemsize else 0
    if config.recompute == "block" and (config.smear_gate or config.layer_lambdas):
        size += stream
    if config.backout and not backout_mid_kept(config):
        size += stream
    return size


def backout_mid_kept(config: GPTConfig) -> bool:
    """Whether x_mid, the output of block n_layer // 2 that backout subtracts, is kept for backward
    without backout: as the input of the next block, by its lambda product or its checkpoint."""
    L = config.n_layer
    return L // 2 < L - 1 and (config.layer_lambdas or config.recompute == "block")


# ---------------------------------------------------------------------------------------------
# the plan

@dataclass
class MemoryPlan:
    """Bytes of each component, and of what is alive at each moment of a training step."""

    components: dict[str, int]
    notes: dict[str, str]
    phases: dict[str, int]
    phase_parts: dict[str, tuple[str, ...]]

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.__getitem__)

    @property
    def peak(self) -> int:
        return self.phases[self.peak_phase]


def plan_memory(config: GPTConfig, batch_size: int, dtype: str = "bfloat16", grad_accum_steps: int = 2,
                device_type: str = "cuda", param_dtype: str = "float32", grad_dtype: str = "auto",
                optim_state: str = "float32") -> MemoryPlan:
    """Predicted peak memory of a training step of `config` with micro-batches of `batch_size`
    sequences of config.sequence_len tokens: `dtype` compute (bf16 = autocast), base_train's
    optimizers (AdamW for embedding, head and the recipe pieces, Muon for the blocks' matrices,
    value-embedding gates included).

    device_type: "cuda" (fused AdamW, Newton-Schulz in bf16) or "cpu" (AdamW's for-loop
    implementation keeps a temporary denominator; Newton-Schulz in bf16 on CPUs that have it).
    param_dtype, grad_dtype, optim_state: setup_optimizers' precision options (nanochat/precision.py,
    MemoryFlags.precision_options()). bfloat16 weights: every parameter in bf16 (no fp32 copy); the
    residual stream in bf16 on CUDA, in fp32 on a CPU (GPT.stream_dtype, stream_value_bytes), and the
    compute in autocast's dtype or else the stream's; gradients in the weights' dtype, or summed in
    fp32 buffers (grad_dtype float32); int8: Muon's momentum and AdamW's moments 8-bit (state_bytes).
    Planning 8-bit states needs no torchao.
    """
    if dtype not in ITEMSIZE:
        raise ValueError(f"dtype: expected one of {'|'.join(ITEMSIZE)}, got {dtype!r}")
    if batch_size < 1 or grad_accum_steps < 1:
        raise ValueError(f"batch_size and grad_accum_steps: expected >= 1, got {batch_size} and {grad_accum_steps}")
    check_precision_options(param_dtype, grad_dtype)  # optim_state apart: its check looks for torchao
    if optim_state not in OPTIM_STATES:
        raise ValueError(f"optim_state={optim_state!r}: expected one of {'|'.join(OPTIM_STATES)}")
    bf16_weights = param_dtype == "bfloat16"
    weight = ITEMSIZE[param_dtype]  # a parameter's bytes
    stream = stream_value_bytes(param_dtype, device_type)  # a residual-stream value's
    item = 2 if dtype == "bfloat16" else stream  # the compute dtype's: autocast's, or the stream's
    fp32_buffer = bf16_weights and grad_dtype == "float32"  # precision.prepare_parameters' accumulation hook
    grad_item = FP32 if fp32_buffer else weight
    int8 = optim_state == "int8"
    d, V, L, T, k = config.n_embd, config.vocab_size, config.n_layer, config.sequence_len, config.molegrad_rank_k
    N = batch_size * T
    # shapes, parameters, optimizer state and MoleGrad's buffers: read off the model (read_model)
    model = read_model(config)
    shapes, compressed, dense_block = model.linears, model.molegrad, model.dense_block
    lowrank = config.molegrad_momentum == "lowrank"
    # recipe pieces (GPTConfig.recipe_pieces): value embeddings (vocab x kv_dim per carrying block)
    # and the small lambdas and gates are AdamW parameters, the value-embedding gates Muon matrices
    kv, n_ve = config.n_kv_head * config.head_dim, model.value_embeds
    pieces = config.recipe_pieces()
    small = [piece for piece in pieces if piece != "value_embeds"]  # pieces with a few scalars or a tiny gate
    ve_note = f", value embeddings {n_ve} x {V}x{kv}" if n_ve else ""
    small_note = f", {'+'.join(small)} scalars and gates" if small else ""
    state_note = ("8-bit (1 B + an fp32 scale per 256 values; tensors under "
                  f"{MIN_QUANTIZED_NUMEL} values fp32) and its code tables" if int8 else "fp32")

    c: dict[str, int] = {}
    notes: dict[str, str] = {}

    def add(name: str, size: int, note: str) -> None:
        c[name], notes[name] = int(size), note

    add("params", weight * model.params,
        ("bf16 weights, updated with stochastic rounding (no fp32 copy)" if bf16_weights else "fp32 master weights")
        + f": embedding and head {V}x{d} each, {L} blocks" + (ve_note + " and their gates" if n_ve else "") + small_note)
    adamw_quantized = int8 and model.adamw_int8_bytes < FP32 * model.adamw  # some AdamW tensor is quantized
    add("AdamW moments", (2 * model.adamw_int8_bytes if int8 else 2 * FP32 * model.adamw) + FP32 * model.adamw_tensors
        + (2 * CODE_TABLE_BYTES if adamw_quantized else 0),
        f"exp_avg, exp_avg_sq ({state_note}) of embedding, head" + ve_note + small_note + "; a step count per tensor")
    # Muon's momentum: (out, in) per matrix, (out, k) per MoleGrad matrix with low-rank momentum (Muon._update_molegrad)
    momentum = model.muon - (model.molegrad_weights - model.molegrad_factors if lowrank else 0)
    momentum_int8 = model.muon_lowrank_int8_bytes if lowrank else model.muon_int8_bytes
    muon_quantized = int8 and momentum_int8 < FP32 * momentum
    add("Muon momentum", (momentum_int8 if int8 else FP32 * momentum) + (CODE_TABLE_BYTES if muon_quantized else 0),
        f"{state_note}, (out, in) per block matrix" + (f"; MoleGrad matrices (out, {k})" if compressed and lowrank else "")
        + (f"; {n_ve} value-embedding gates" if n_ve else ""))
    add("MoleGrad buffers", model.molegrad_buffer_bytes,
        "Q, scouts, sketch, step sketch: 3(k+e) x in, gradient sink out x k, fp32 per layer"
        + ("; probes out x t and their sink in x t" if model.molegrad_probes else "") if compressed else "-")
    add("rotary tables", model.rotary_bytes, f"cos, sin: {ROTARY_LENGTH_FACTOR}T x head_dim fp32")
    add("batch", INT64 * batch_size * (T + 1), "token ids, int64")
    add("gradients",
        grad_item * (model.params - model.molegrad_weights) + FP32 * (model.molegrad_factors + model.molegrad_probes),
        ("fp32 accumulation buffers" if fp32_buffer else f"{'bf16' if grad_item == 2 else 'fp32'} p.grad")
        + " of dense params" + (ve_note.replace(",", " (with", 1) + ")" if n_ve else "")
        + (f"; MoleGrad (out, {k}) factors, fp32" if compressed else "")
        + ("; probe images (in, t), fp32" if model.molegrad_probes else ""))
    rotary_copies = 2 * T * config.head_dim * item if item != FP32 else 0
    per_token, weights = block_saved_bytes_per_token(config, item, stream), block_saved_weight_bytes(config, item, weight)
    ve_per_token = value_embed_saved_bytes_per_token(config, item, stream)
    ve_weights = value_embed_saved_weight_bytes(config, item, weight)
    add("activations: blocks", L * (N * per_token + weights) + n_ve * (N * ve_per_token + ve_weights) + rotary_copies,
        f"{L} x {N} tokens x {per_token} B" + (f" + weight copies {L} x {weights} B" if weights else "")
        + (f"; value embeddings {n_ve} x {N} x {ve_per_token} B" if n_ve else ""))
    add("activations: recipe pieces", recipe_saved_bytes(config, batch_size, item, stream, weight),
        "kept by " + ", ".join(p for p in pieces if p != "value_embeds") + " outside the blocks"
        if set(pieces) - {"value_embeds"} else "-")
    add("activations: embedding", N * (stream * d + FP32) - (N * stream * d if config.recompute == "block" else 0),
        f"normed embedding output, {'bf16' if stream == 2 else 'fp32'}"
        + (" (block 0's checkpoint keeps the same tensor)" if config.recompute == "block" else ""))
    add("activations: LM head", N * (2 * item * d + FP32) + weight * model.head,
        f"final norm and dloss/dhidden ({N} x {d}), dloss/dW_head ({V}x{d}, the weights' dtype)")
    rows = min(LOSS_CHUNK_ROWS, N)
    # sigmoid, exp and s(1-s) in fp32; dz in the compute dtype (torch.mul(..., out=) casts as it
    # writes: no fp32 temporary, memory_measure.measure_allocated_peak); the previous chunk's dz is still
    # referenced while the next one is computed
    fp32_copies = 3
    dz_copies = 2 if N > rows else 1
    add("transient: loss chunk", rows * V * (fp32_copies * FP32 + dz_copies * item)
        + (item * model.head if item != weight else 0) + 2 * FP32 * N,
        f"{rows} x {V} logits: {fp32_copies} fp32 + {dz_copies} compute-dtype copies"
        + (", head weight in the compute dtype" if item != weight else ""))
    cast_cache = item * sum(shapes[name][0] * shapes[name][1] for name in autocast_weight_names(config))
    autocast_cache = dtype == "bfloat16" and weight == FP32  # autocast caches its casts of fp32 weights
    add("transient: autocast weight cache", L * (cast_cache - weights) if autocast_cache else 0,
        "bf16 copies of block weights, alive until forward ends (beyond those saved)" if autocast_cache else "-")
    # one block's backward: h and dh of the MLP (or attention's dq, dk, dv and the residual gradient),
    # what a recomputed region saves again, the block's dense weight gradients in bf16 and fp32
    recomputed = 0
    if config.recompute != "none":
        # what the rerun saves: a MoleGrad MLP keeps h inside a recompute (gpt.MLP.keep_h)
        rerun = replace(config, recompute="none", molegrad_keep_h="mlp.c_fc" in compressed)
        recomputed = N * block_saved_bytes_per_token(rerun, item, stream) + block_saved_weight_bytes(rerun, item, weight)
        if config.recompute == "mlp":
            recomputed -= N * block_saved_bytes_per_token(replace(config, recompute="mlp"), item, stream)
        elif n_ve:  # the last block carries a value embedding: its gate's activations, saved again
            recomputed += (N * (value_embed_saved_bytes_per_token(rerun, item, stream) - ve_per_token)
                           + value_embed_saved_weight_bytes(rerun, item, weight))
    # h and dh (N x 4d each); inside a recompute h is among the recomputed activations already; the
    # gradient subspace's MoleGrad MLP also makes relu²(h) for its probes (MoleGradMLPFunction; measured)
    mlp_temporaries = (4 if config.recompute != "none" else 8) * d * item
    if config.molegrad_subspace == "gradient" and "mlp.c_fc" in compressed:
        mlp_temporaries += 4 * d * item
    # p.grad in the weights' dtype, under autocast the bf16 matmul result, with the fp32 buffer its sum
    weight_grad_copies = weight + (item if item != weight else 0) + (FP32 if fp32_buffer else 0)
    add("transient: backward workspace", N * (mlp_temporaries + 2 * stream * d) + recomputed + weight_grad_copies * dense_block,
        "one block: h and dh (N x 4d each), residual gradients, recomputed activations, its weight gradients")
    ns_item = 2 if device_type == "cuda" or cpu_has_native_bf16() else 4
    # the embedding's new gradient, before it is added to the accumulated one (or to its fp32 buffer)
    embedding_grad = (weight * model.embedding if grad_accum_steps > 1 or fp32_buffer else 0) + 2 * stream * N * d
    add("transient: optimizer workspace",
        max(muon_workspace(model, lowrank, ns_item, bf16_weights, grad_item, int8),
            adamw_workspace(model, device_type, bf16_weights, grad_item, int8), embedding_grad),
        "largest of Muon's step of its largest matrix (Newton-Schulz" + (", 8-bit (de)quantization" if int8 else "")
        + (", fp32 working copy, random bits" if bf16_weights else "") + "), AdamW's"
        + (" span of at most 4M values" if int8 or bf16_weights else " denominator (not fused)")
        + ", the embedding's new gradient")

    persistent = ("params", "AdamW moments", "Muon momentum", "MoleGrad buffers", "rotary tables", "batch")
    activations = ("activations: blocks", "activations: recipe pieces", "activations: embedding", "activations: LM head")
    earlier_grads = ("gradients",) if grad_accum_steps > 1 else ()
    parts = {
        "forward (in the loss)": persistent + earlier_grads + activations
        + ("transient: loss chunk", "transient: autocast weight cache"),
        "backward": persistent + earlier_grads + activations + ("transient: backward workspace",),
        "optimizer step": persistent + ("gradients", "transient: optimizer workspace"),
    }
    phases = {name: sum(c[p] for p in names) for name, names in parts.items()}
    # backward starts with the head's gradient (V x d) beside the saved one, and keeps it (unless it
    # is added into an accumulated one) while the blocks run backward
    head_grad = weight * model.head
    phases["backward"] += max(head_grad + N * item * d, 0 if grad_accum_steps > 1 else grad_item * model.head)
    # backout: d loss/d x_mid (N x d) lives from the start of the blocks' backward until block
    # n_layer // 2 (where only backout kept x_mid, in its place). With a recompute the blocks'
    # backward (the rerun) is backward's largest moment, and it counts (measured); without, the
    # loss's backward is, before it exists.
    if config.backout and backout_mid_kept(config) and config.recompute != "none":
        phases["backward"] += stream * N * d
    # Not added: a value-embedding table's dense gradient (V x kv_dim, in "gradients"), made once
    # its block's backward is done, after the loss's backward has freed the LM head's activations (N x d
    # in the compute dtype and V x d, which outweigh it: kv_dim <= d); measured, it adds nothing
    # to the peak, with one micro-batch or several.
    return MemoryPlan(c, notes, phases, parts)


# the tables of an 8-bit state's map (precision.OptimizerStates.qmap and code_table), made at the first
# step: 256 fp32 codes, and an int32 base and an fp32 cut per bf16 pattern; AdamW has two (signed and
# unsigned), Muon one
CODE_TABLE_BYTES = 256 * FP32 + (1 << 16) * 2 * FP32
# bytes per value of precision.OptimizerStates.quantize's temporaries: the padded copy, |x| (freed
# after the block maxima), x / scale, the key (two int32 passes), the codes as int32, the cuts
# gathered, the comparison (bool), the uint8 codes (measured: 21 B)
QUANTIZE_TEMPORARY = 21


def muon_workspace(model: ModelFacts, lowrank: bool, ns_item: int, bf16_weights: bool, grad_item: int, int8: bool) -> int:
    """Bytes Muon's step holds beyond its state and the gradients, on its most demanding matrix
    (optim.Muon._update, _update_molegrad; measured on single matrices). A step of an (out, in)
    momentum holds its update (fp32), with 8-bit states the momentum dequantized, and what the caller
    says (`held`), and at three moments: the 8-bit momentum's quantization; Newton-Schulz (the
    normalised update and the next iterate, ns_item each, two Gram-sized products); the commit (the
    orthogonalised update, and with bf16 weights what `commit` says). A dense matrix holds its
    gradient cast to fp32 (bf16 gradients) and commits an fp32 working copy and the stochastic
    rounding's int32 bits; a MoleGrad matrix holds its working copy from the start. With low-rank
    momentum it runs the step on (out, k), beside its (out, in) working copy, and commits the bits."""

    def step(out: int, inp: int, held: int, commit: int) -> int:
        n, r = out * inp, min(out, inp)
        held += FP32 * n + (FP32 * n if int8 else 0)  # the update, the dequantized momentum
        quantize = QUANTIZE_TEMPORARY * n if int8 else 0
        newton_schulz = 2 * ns_item * n + 2 * ns_item * r * r
        return held + max(quantize, newton_schulz, ns_item * n + commit)

    out, inp = model.dense_matrix_largest
    n = out * inp
    dense = step(out, inp, FP32 * n if grad_item == 2 else 0, 2 * FP32 * n if bf16_weights else 0)
    out, inp = model.molegrad_largest
    if not out:
        return dense
    working = FP32 * out * inp if bf16_weights else 0  # the working copy, and later the bits, of (out, in)
    if lowrank:
        k = model.molegrad[next(iter(model.molegrad))][0]
        molegrad = working + step(out, k, 0, working)
    else:
        molegrad = step(out, inp, working, working)
    return max(dense, molegrad)


def adamw_workspace(model: ModelFacts, device_type: str, bf16_weights: bool, grad_item: int, int8: bool) -> int:
    """Bytes AdamW's step holds beyond its state and the gradients (optim.AdamW; measured on single
    tensors). torch's AdamW (fp32 weights and states): fused on CUDA, none; its for-loop on CPU, the
    denominator and sqrt(v) of the largest tensor. The own loop (bf16 weights or 8-bit states), per
    span of at most precision.SPAN values of the largest tensor: with bf16 weights an fp32 working copy,
    with bf16 gradients their fp32 copy, and either the denominator being made (sqrt(v), v / bias
    correction, and the previous span's denominator, alive until then) or, with 8-bit states, both
    moments dequantized, the denominator and one quantization."""
    if not (bf16_weights or int8):
        return 0 if device_type == "cuda" else 2 * FP32 * model.adamw_largest
    n = min(SPAN, model.adamw_largest)
    held = (FP32 if bf16_weights else 0) + (FP32 if grad_item == 2 else 0)
    per_value = held + (3 * FP32 + QUANTIZE_TEMPORARY if int8 else 3 * FP32)
    return per_value * n


def available_memory(device: torch.device) -> int | None:
    """Bytes a training step on `device` can still use: free GPU memory (CUDA), MemAvailable of
    /proc/meminfo (CPU), MPS's recommended working set less what is allocated; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory()
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# sizes as text

SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'32GB' -> 32e9 bytes, '24GiB' -> 24 * 2**30, '1.5 GiB', '1000000' (bytes)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in SIZE_UNITS:
        raise ValueError(f"expected a size like 32GB or 24GiB, got {text!r}")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


# --gpu_memory=16GB|24GB|32GB: a card of that class as the driver reports it (nvidia-smi's total,
# e.g. RTX 5080 16303 MiB, RTX 4090 24564 MiB, RTX 5090 32607 MiB), not 10^9-byte gigabytes.
GPU_PRESETS = {"16GB": 16303 * MiB, "24GB": 24564 * MiB, "32GB": 32607 * MiB}
# What a plan leaves free on a GPU: max(2 GiB, 5% of its memory), for what no plan counts: the CUDA
# context (~0.5 GiB, more when the card also drives a display), allocator fragmentation, cuBLAS
# workspaces and FlashAttention's fp32 dq accumulator in backward.
RESERVE_MIN = 2 * GiB
RESERVE_FRACTION = 0.05


def memory_reserve(total: int) -> int:
    """Bytes to keep free beyond the plan on a GPU of `total` bytes (the planner's --reserve=auto,
    base_train's fit check, bench/gpu_check.py's budget)."""
    return max(RESERVE_MIN, int(RESERVE_FRACTION * total))


def reserve_bytes(reserve: str, total: int) -> int:
    """--reserve: "auto" (memory_reserve) or a size."""
    return memory_reserve(total) if reserve == "auto" else parse_size(reserve)


def gpu_bytes(text: str) -> int:
    """A GPU's memory: a GPU_PRESETS name (16GB, 24GB, 32GB) or an explicit size ('24GiB', '23.5GiB')."""
    return GPU_PRESETS[text] if text in GPU_PRESETS else parse_size(text)


def format_size(size: float) -> str:
    if abs(size) >= GiB:
        return f"{size / GiB:.2f} GiB"
    return f"{size / MiB:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# the command line

# name -> the memory flags of the settings --sweep_depths compares: model_flags.MEMORY_SETTINGS (the
# other memory flags at their defaults; MoleGrad at --molegrad_rank_k, the recipe pieces as the flags say)
SWEEP_ARMS: dict[str, dict[str, Any]] = {
    **{name: MEMORY_SETTINGS[name] for name in
       ("dense", "recompute_block", "molegrad_ffn", "molegrad_all_lowrank", "keep_h", "low", "lowest")},
    # lowest at a width-proportional rank (k = width / 4, k/in = 1/4 for c_q..c_fc, 1/16 for the MLP's c_proj):
    # the largest rank bench.molegrad_quality measured for every Linear compressed (+4.4% val bpb, gap growing)
    "lowest_k=w/4": dict(MEMORY_SETTINGS["lowest"], rank_per_width=0.25),
    # the practitioner's stack, the MoleGrad presets at its precision, and each precision option alone
    **{name: MEMORY_SETTINGS[name] for name in
       ("standard", "low_bf16", "lowest_bf16", "keep_h_bf16", "bf16_weights", "bf16_weights_fp32_grads", "int8_states")},
}
# the MoleGrad presets at standard's precision (PRACTITIONER_PRECISION), compared with it like for like
MOLEGRAD_AT_STANDARD = ("low_bf16", "lowest_bf16", "keep_h_bf16")
# --sweep_arms' default: the fp32 baselines, standard, and the MoleGrad presets in fp32 and at standard's precision
DEFAULT_SWEEP_ARMS = ("dense", "recompute_block", "standard", "low", "lowest", *MOLEGRAD_AT_STANDARD)


@dataclass
class PlanFlags(ModelFlags):
    """Predict peak training memory by component; check it against a GPU budget or a measured step."""

    depth: int = field(default=12, metadata={"help": "transformer blocks; sets width and heads"})
    max_seq_len: int = field(default=8192, metadata={"help": "context length in tokens"})
    device_batch_size: int = field(default=1, metadata={"help": "sequences per forward/backward"})
    vocab_size: int = field(default=65536, metadata={"help": "vocabulary"})
    dtype: str = field(default="bfloat16", metadata={"help": "compute dtype (bf16 = autocast; the weights' dtype "
                                                             "is --param_dtype)", "choices": tuple(ITEMSIZE)})
    grad_accum_steps: int = field(default=2, metadata={
        "help": "micro-batches per optimizer step; above 1 the earlier ones' gradients are alive during "
                "forward (run10.sh: 32)"})
    gpu_memory: str = field(default="32GB", metadata={
        "help": f"memory of the GPU: {'|'.join(GPU_PRESETS)} (a card's real memory, GPU_PRESETS) or a size, e.g. 23.5GiB"})
    reserve: str = field(default="auto", metadata={
        "help": "kept free beyond the peak (context, fragmentation, workspaces): auto = max(2 GiB, 5% of --gpu_memory), or a size"})
    require_fit: bool = field(default=False, metadata={"help": f"exit with status {DOES_NOT_FIT} if it does not fit"})
    measure: bool = field(default=False, metadata={"help": "also run 2 real training steps and compare (CUDA if "
                                                           "available, else CPU: keep the model small)"})
    sweep_depths: bool = field(default=False, metadata={
        "help": "the deepest model that fits, per memory setting (with recipe pieces on, also without them, "
                "and what they add)"})
    sweep_arms: str = field(default=",".join(DEFAULT_SWEEP_ARMS), metadata={
        "help": f"the settings --sweep_depths compares, comma-separated, or all: {', '.join(SWEEP_ARMS)}"})

    def validate(self) -> None:
        super().validate()
        check(self.depth >= 1, f"--depth: expected >= 1, got {self.depth}")
        check(self.max_seq_len >= 2, f"--max_seq_len: expected >= 2, got {self.max_seq_len}")
        check(self.device_batch_size >= 1, f"--device_batch_size: expected >= 1, got {self.device_batch_size}")
        check(self.vocab_size >= 2, f"--vocab_size: expected >= 2, got {self.vocab_size}")
        check(self.grad_accum_steps >= 1, f"--grad_accum_steps: expected >= 1, got {self.grad_accum_steps}")
        unknown = [arm for arm in self.selected_arms() if arm not in SWEEP_ARMS]
        check(not unknown, f"--sweep_arms: unknown {','.join(unknown)}; expected all or names among {','.join(SWEEP_ARMS)}")
        for name, parse in (("gpu_memory", gpu_bytes), ("reserve", lambda text: reserve_bytes(text, 0))):
            try:
                parse(getattr(self, name))
            except ValueError as e:
                check(False, f"--{name}: {e}")
        with flag_errors(self):  # the model this plans: e.g. a rank above its width
            self.model_config()

    def model_config(self, depth: int | None = None) -> GPTConfig:
        """The GPTConfig these flags plan, at `depth` (default --depth)."""
        return config_from_depth(self.depth if depth is None else depth, self.vocab_size, self.max_seq_len,
                                 **self.model_options())

    def selected_arms(self) -> list[str]:
        """--sweep_arms as a list of SWEEP_ARMS names."""
        return list(SWEEP_ARMS) if self.sweep_arms == "all" else [arm for arm in self.sweep_arms.split(",") if arm]


def precision_text(param_dtype: str = "float32", grad_dtype: str = "auto", optim_state: str = "float32") -> str:
    """The precision options in words: 'fp32 master weights, fp32 gradients, fp32 optimizer states', ..."""
    bf16 = param_dtype == "bfloat16"
    weights = "bf16 weights + stochastic rounding" if bf16 else "fp32 master weights"
    grads = "fp32 gradient buffer" if bf16 and grad_dtype == "float32" else f"{'bf16' if bf16 else 'fp32'} gradients"
    states = "int8 optimizer states" if optim_state == "int8" else "fp32 optimizer states"
    return f"{weights}, {grads}, {states}"


def describe(config: GPTConfig, batch_size: int, dtype: str, grad_accum_steps: int, **precision: str) -> str:
    """The planned step in one line; precision: plan_memory's param_dtype, grad_dtype, optim_state."""
    molegrad = (f"MoleGrad {config.molegrad_targets} k={config.molegrad_rank_k} ({config.molegrad_momentum} momentum"
                f"{', h kept' if config.molegrad_keep_h else ''}"
                f"{', ' + config.molegrad_subspace + ' subspace' if config.molegrad_subspace != 'principal' else ''})"
                if config.molegrad_rank_k else "no MoleGrad")
    compute = "bf16 autocast" if dtype == "bfloat16" else "no autocast"
    accum = "gradient accumulation" if grad_accum_steps > 1 else "one micro-batch per step"
    return (f"depth {config.n_layer} (width {config.n_embd}, {config.n_head} heads), {batch_size} x {config.sequence_len} "
            f"tokens, vocab {config.vocab_size:,}, {compute}, {precision_text(**precision)}, recompute {config.recompute}, "
            f"{molegrad}, {accum}, " + ("recipe pieces " + "+".join(config.recipe_pieces()) if config.recipe_pieces()
                                        else "no recipe pieces"))


def format_plan(plan: MemoryPlan) -> str:
    lines = [f"{'component':<36}{'size':>12}  {'peak':>4}  note"]
    in_peak = plan.phase_parts[plan.peak_phase]
    for name, size in plan.components.items():
        lines.append(f"{name:<36}{format_size(size):>12}  {'*' if name in in_peak else '':>4}  {plan.notes[name]}")
    lines.append("moments: " + " | ".join(f"{name} {format_size(size)}" for name, size in plan.phases.items()))
    lines.append(f"predicted peak: {format_size(plan.peak)} ({plan.peak_phase}; * = alive then)")
    return "\n".join(lines)


def fit_line(peak: int, reserve: int, budget: int, budget_text: str) -> tuple[bool, str]:
    need = peak + reserve
    fits = need <= budget
    verdict = "fits" if fits else "does not fit"
    return fits, (f"{verdict} in {budget_text} ({format_size(budget)}): peak {format_size(peak)} + reserve "
                  f"{format_size(reserve)} = {format_size(need)}, headroom {format_size(budget - need)}")


def sweep_arm_flags(flags: PlanFlags, arm: str, width: int) -> PlanFlags:
    """The flags of SWEEP_ARMS[arm] at a model of this width, with --molegrad_rank_k and the recipe pieces of `flags`."""
    options = dict(SWEEP_ARMS[arm])
    rank = max(1, round(width * options.pop("rank_per_width"))) if "rank_per_width" in options else flags.molegrad_rank_k
    pieces = {name: getattr(flags, name) for name in RECIPE_PIECES}
    return replace(PlanFlags(), depth=flags.depth, max_seq_len=flags.max_seq_len, vocab_size=flags.vocab_size,
                   molegrad_rank_k=rank, **pieces, **options)


def sweep_label(arm: str, rank_k: int) -> str:
    """A SWEEP_ARMS setting's column in the table: its name, and the rank where it trains at --molegrad_rank_k."""
    options = SWEEP_ARMS[arm]
    at_flag_rank = "rank_per_width" not in options and replace(PlanFlags(), **options).molegrad_on()
    return f"{arm}_k{rank_k}" if at_flag_rank else arm


def sweep_depths(flags: PlanFlags, max_depth: int = 64) -> dict[str, Any]:
    """Peak per depth for each setting of --sweep_arms (SWEEP_ARMS; MoleGrad at --molegrad_rank_k, or
    at a rank proportional to the width where the setting says so; each with its own precision),
    printed as a table. Returns {"deepest": setting -> the deepest depth that fits (0 = none),
    "deepest_params": setting -> its parameters}. With recipe pieces on (--value_embeds=True, ...)
    every setting is planned with and without them: the table gets a second part, what the pieces
    add to the peak, and the result "deepest_without_pieces", "deepest_params_without_pieces" and
    "price_bytes" (setting -> depth -> bytes the pieces add). With `standard` among the settings, the
    MoleGrad presets at its precision (MOLEGRAD_AT_STANDARD) are compared with it in parameters:
    "params_over_standard" (variant -> setting -> ratio), and a last line per variant."""
    arms = flags.selected_arms()
    budget = gpu_bytes(flags.gpu_memory)
    reserve = reserve_bytes(flags.reserve, budget)
    pieces = [name for name in RECIPE_PIECES if getattr(flags, name)]
    variants = {"with": {}, "without": {name: False for name in RECIPE_PIECES}} if pieces else {"with": {}}
    deepest = {variant: {arm: 0 for arm in arms} for variant in variants}
    rows = []
    for depth in range(1, max_depth + 1):
        peaks: dict[str, dict[str, int]] = {variant: {} for variant in variants}
        params = {}
        width = config_from_depth(depth, flags.vocab_size, flags.max_seq_len).n_embd
        for arm in arms:
            arm_flags = sweep_arm_flags(flags, arm, width)
            for variant, off in variants.items():
                config = replace(arm_flags, **off).model_config(depth)
                peak = plan_memory(config, flags.device_batch_size, flags.dtype, flags.grad_accum_steps,
                                   **arm_flags.precision_options()).peak
                peaks[variant][arm], params[variant] = peak, read_model(config).params
                if peak + reserve <= budget:
                    deepest[variant][arm] = depth
        rows.append((depth, width, params, peaks))
        if all(peak + reserve > budget for by_arm in peaks.values() for peak in by_arm.values()):
            break
    params_at = {row[0]: row[2] for row in rows}
    deepest_params = {variant: {arm: params_at[depth][variant] if depth else 0 for arm, depth in by_arm.items()}
                      for variant, by_arm in deepest.items()}
    with_pieces = f", recipe pieces {'+'.join(pieces)}" if pieces else ""
    print(f"peak training memory by depth: {flags.device_batch_size} x {flags.max_seq_len} tokens, vocab {flags.vocab_size:,}, "
          f"{'bf16 autocast' if flags.dtype == 'bfloat16' else 'fp32'} compute, "
          f"{'gradient accumulation' if flags.grad_accum_steps > 1 else 'one micro-batch per step'}{with_pieces}; "
          f"{precision_text()} unless the setting says otherwise (standard, *_bf16: {precision_text(**PRACTITIONER_PRECISION)}); "
          f"GiB, x = does not fit in {flags.gpu_memory} with {format_size(reserve)} reserve")
    names = [sweep_label(arm, flags.molegrad_rank_k) for arm in arms]
    shown = {depth for by_arm in deepest.values() for depth in by_arm.values()}
    printed = [row for row in rows if not row[0] % 2 or row[0] in shown or row[0] == rows[-1][0]]
    header = f"{'depth':>5}{'width':>6}{'params':>9}" + "".join(f"{name:>{len(name) + 3}}" for name in names)
    print(header)
    for depth, width, params, peaks in printed:  # even depths, and the deepest that fits for each setting
        cells = "".join(f"{peaks['with'][arm] / GiB:>{len(name) + 2}.1f}{'x' if peaks['with'][arm] + reserve > budget else ' '}"
                        for name, arm in zip(names, arms))
        print(f"{depth:>5}{width:>6}{params['with'] / 1e6:>8.0f}M{cells}")
    result: dict[str, Any] = {"deepest": deepest["with"], "deepest_params": deepest_params["with"]}
    if pieces:
        print(f"what {'+'.join(pieces)} add to the peak (GiB) and to the parameters; x = does not fit without them either")
        print(header)
        for depth, width, params, peaks in printed:
            cells = "".join(f"{(peaks['with'][arm] - peaks['without'][arm]) / GiB:>+{len(name) + 2}.1f}"
                            f"{'x' if peaks['without'][arm] + reserve > budget else ' '}" for name, arm in zip(names, arms))
            print(f"{depth:>5}{width:>6}{(params['with'] - params['without']) / 1e6:>+8.0f}M{cells}")
        result["deepest_without_pieces"] = deepest["without"]
        result["deepest_params_without_pieces"] = deepest_params["without"]
        result["price_bytes"] = {arm: {row[0]: row[3]["with"][arm] - row[3]["without"][arm] for row in rows} for arm in arms}
    for variant, label in (("with", f"deepest that fits {flags.max_seq_len} tokens x {flags.device_batch_size} in "
                                    f"{flags.gpu_memory}{with_pieces}"), ("without", f"without {'+'.join(pieces)}")):
        if variant in deepest:
            print(f"{label}: " + ", ".join(f"{name} depth {deepest[variant][arm]} ({deepest_params[variant][arm] / 1e9:.2f}B)"
                                           for name, arm in zip(names, arms)))
    compared = [arm for arm in MOLEGRAD_AT_STANDARD if arm in arms]
    if "standard" in arms and compared:  # parameters of the deepest fit, over standard's (issue 25's goal: >= 1.5x)
        result["params_over_standard"] = {}
        for variant, label in (("with", with_pieces[2:] or "no recipe pieces"), ("without", f"without {'+'.join(pieces)}")):
            if variant in deepest:
                by_params, standard = deepest_params[variant], deepest_params[variant]["standard"]
                ratios = {arm: by_params[arm] / standard if standard else float("inf") for arm in compared}
                result["params_over_standard"][variant] = ratios
                print(f"parameters over standard's (depth {deepest[variant]['standard']}, {standard / 1e9:.2f}B) in "
                      f"{flags.gpu_memory}, {label}: "
                      + ", ".join(f"{arm} {ratio:.2f}x (depth {deepest[variant][arm]})" for arm, ratio in ratios.items()))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    flags = parse_args(PlanFlags, argv, prog="python -m nanochat.memory")
    if flags.sweep_depths:
        return sweep_depths(flags)
    config = flags.model_config()
    # the plan is for a GPU (fused AdamW), unless it is checked here against a CPU step
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan_device = device if flags.measure else "cuda"
    precision = flags.precision_options()
    plan = plan_memory(config, flags.device_batch_size, flags.dtype, flags.grad_accum_steps, plan_device, **precision)
    print(f"memory plan ({plan_device}): "
          + describe(config, flags.device_batch_size, flags.dtype, flags.grad_accum_steps, **precision))
    print(format_plan(plan))
    fits, line = fit_line(plan.peak, reserve_bytes(flags.reserve, gpu_bytes(flags.gpu_memory)), gpu_bytes(flags.gpu_memory),
                          flags.gpu_memory)
    print(line)
    out: dict[str, Any] = {"peak_bytes": plan.peak, "fits": fits, "components": plan.components, "phases": plan.phases}
    if flags.measure:
        measured = measure_peak(config, flags.device_batch_size, flags.dtype, flags.grad_accum_steps, device=device,
                                **precision)
        how = ("torch.cuda.max_memory_allocated" if device == "cuda" else
               "CPU resident-set high-water mark, fresh process, glibc malloc returning freed memory")
        print(f"measured peak: {format_size(measured)} ({how}); prediction error {100 * (plan.peak / measured - 1):+.1f}%")
        out["measured_bytes"] = measured
        if device == "cpu":
            allocated = measure_allocated_peak(config, flags.device_batch_size, flags.dtype, flags.grad_accum_steps,
                                               **precision)
            print(f"allocated peak: {format_size(allocated)} (tensor storage alive at once, as CUDA counts it); "
                  f"prediction error {100 * (plan.peak / allocated - 1):+.1f}%")
            out["allocated_bytes"] = allocated
    if flags.require_fit and not fits:
        print(f"error: the memory plan does not fit: {line}", file=sys.stderr)
        raise SystemExit(DOES_NOT_FIT)
    return out


if __name__ == "__main__":
    main()
