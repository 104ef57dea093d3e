"""The model and memory flags, declared once: every training stage, the memory planner and the
benches take these groups, and they alone turn flags into GPTConfig options.

- `MemoryFlags`: how a model trains within memory: exact recompute, MoleGrad (low-rank weight
  gradients, nanochat/molegrad.py), the precision of weights, gradients and optimizer states
  (nanochat/precision.py) and `--memory_mode`, a preset of them (MEMORY_MODES). Every training
  stage takes it.
- `ModelFlags`: MemoryFlags and the four recipe pieces, which shape the weights; only base_train
  (and the planner) take it: later stages keep their checkpoint's architecture.

MEMORY_SETTINGS names the settings that the benches and the planner compare (dense, recompute_block,
molegrad_ffn, lowest, ...), each once.

Each flag is named like the GPTConfig field (memory_options()) or the setup_optimizers option
(precision_options()) it sets; the seed's spellings (--enable_streaming, --streaming_rank_k,
--streaming_target_layers, --streaming_*) are aliases. MoleGrad is on when `--molegrad` is, or a
memory mode that does not turn it off is chosen: `molegrad_on()`, the one place that says so. Value
checks live with the model (gpt.check_memory_options) and the optimizers
(precision.check_precision_options); `flag_errors()` names the flag in them.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from nanochat.config import ConfigError, Flags
from nanochat.gpt import MEMORY_OPTIONS, RECIPE_PIECES, RECOMPUTE_MODES, check_memory_options
from nanochat.molegrad import MOLEGRAD_MOMENTA, MOLEGRAD_SUBSPACES, MOLEGRAD_TARGETS, check_options
from nanochat.precision import GRAD_DTYPES, OPTIM_STATES, PARAM_DTYPES, PRECISION_OPTIONS, check_precision_options

# The precision a practitioner trains a 1-5B model with on one card (nanochat/precision.py): bf16
# weights updated with stochastic rounding, 8-bit optimizer states; the gradient buffer in bf16.
PRACTITIONER_PRECISION = dict(param_dtype="bfloat16", optim_state="int8")
# --memory_mode presets: each sets these MemoryFlags fields and turns MoleGrad on (at
# --molegrad_rank_k) unless it sets molegrad=False.
# lowest: the least memory per parameter (block recompute, every block Linear compressed, (out, k)
#   momentum, h kept inside the recompute); keep_h: no recompute, every Linear compressed, h kept, so
#   the MLP's backward does not recompute it and the dW matmuls shrink by in/k. low: lowest with only
#   the MLP Linears compressed: compressing attention is what costs quality at GPU-like k/in
#   (docs/molegrad.md), the MLP's low-rank momentum does not.
# standard: the practitioner's stack, MoleGrad's baseline: block recompute, dense gradients,
#   PRACTITIONER_PRECISION. low_bf16, lowest_bf16, keep_h_bf16: the MoleGrad presets with the same
#   precision, for a like-for-like comparison.
MOLEGRAD_PRESETS = {
    "low": dict(recompute="block", molegrad_targets="ffn_only", molegrad_momentum="lowrank", molegrad_keep_h=False),
    "lowest": dict(recompute="block", molegrad_targets="all", molegrad_momentum="lowrank", molegrad_keep_h=False),
    "keep_h": dict(recompute="none", molegrad_targets="all", molegrad_momentum="lowrank", molegrad_keep_h=True),
}
MEMORY_MODES = {
    **MOLEGRAD_PRESETS,
    "standard": dict(molegrad=False, recompute="block", **PRACTITIONER_PRECISION),
    **{f"{name}_bf16": {**preset, **PRACTITIONER_PRECISION} for name, preset in MOLEGRAD_PRESETS.items()},
}


@contextmanager
def flag_errors(flags: Any = None) -> Iterator[None]:
    """A ValueError of an option check that names its option the way the flag is named
    ("molegrad_rank_k=40: expected ...": a GPTConfig memory field or recipe piece, or a field of the
    dataclass `flags`) becomes a ConfigError naming the flag (--molegrad_rank_k=40: ...)."""
    names = {*MEMORY_OPTIONS, *RECIPE_PIECES, *(f.name for f in dataclasses.fields(flags))} if flags is not None \
        else {*MEMORY_OPTIONS, *RECIPE_PIECES}
    try:
        yield
    except ConfigError:
        raise
    except ValueError as e:
        if str(e).split("=", 1)[0].split(":", 1)[0] in names:
            raise ConfigError(f"--{e}") from None
        raise


@dataclass
class MemoryFlags(Flags):
    """Exact recompute, MoleGrad and the memory-mode presets: every training stage takes these."""

    recompute: str = field(default="none", metadata={"help": "exact activation recompute", "choices": RECOMPUTE_MODES})
    molegrad: bool = field(default=False, metadata={"help": "MoleGrad: low-rank weight gradients", "aliases": ("enable_streaming",)})
    molegrad_rank_k: int = field(default=32, metadata={
        "help": "MoleGrad rank k (1 <= k <= layer input width)", "aliases": ("streaming_rank_k",)})
    molegrad_targets: str = field(default="ffn_only", metadata={
        "help": "the Linears MoleGrad compresses", "choices": MOLEGRAD_TARGETS, "aliases": ("streaming_target_layers",)})
    molegrad_power_iters: int = field(default=1, metadata={
        "help": "MoleGrad power-iteration steps per update (>= 1)", "aliases": ("streaming_power_iters",)})
    molegrad_warm_start_decay: float = field(default=0.95, metadata={
        "help": "MoleGrad sketch EMA decay in [0, 1)", "aliases": ("streaming_warm_start_decay",)})
    molegrad_momentum: str = field(default="dense", metadata={
        "help": "Muon momentum of MoleGrad matrices: dense (out x in, fed by the factors) or lowrank "
                "(out x k factors, moved with the subspace)", "choices": MOLEGRAD_MOMENTA, "aliases": ("streaming_momentum",)})
    molegrad_keep_h: bool = field(default=False, metadata={
        "help": "MoleGrad MLP keeps h for backward instead of recomputing it (faster; 4d values per token more)",
        "aliases": ("streaming_keep_h",)})
    molegrad_subspace: str = field(default="principal", metadata={
        "help": "what MoleGrad's Q spans: principal (the inputs' top-k subspace), unbiased (k - k//2 principal "
                "+ k//2 random directions redrawn each step, rescaled so the expected projection is the identity), "
                "gradient (a blend of the inputs' and the weight gradient's top subspaces, from random probes)",
        "choices": MOLEGRAD_SUBSPACES})
    param_dtype: str = field(default="float32", metadata={
        "help": "weights: bfloat16 = every parameter stored in bf16, each update rounded stochastically (no fp32 copy)",
        "choices": PARAM_DTYPES})
    grad_dtype: str = field(default="auto", metadata={
        "help": "gradient-accumulation buffer: auto = the weights' dtype; float32 with bf16 weights sums the "
                "micro-batches in fp32 (bfloat16 needs --param_dtype=bfloat16)", "choices": GRAD_DTYPES})
    optim_state: str = field(default="float32", metadata={
        "help": "optimizer states (Muon momentum, AdamW moments): int8 = 8-bit block-wise (needs torchao: "
                "pip install -e '.[lowmem]')", "choices": OPTIM_STATES})
    memory_mode: str = field(default="custom", metadata={
        "help": "custom = the flags above; low = recompute=block + MoleGrad on the MLP Linears + lowrank momentum "
                "(no measured quality cost); lowest = the same on all Linears (h kept inside the recompute; compressing "
                "attention costs quality at small k); keep_h = MoleGrad on all Linears + lowrank momentum + keep h, no "
                "recompute (each turns MoleGrad on, at --molegrad_rank_k); standard = recompute=block + bf16 weights + "
                "8-bit states, no MoleGrad (the practitioner's stack); low_bf16, lowest_bf16, keep_h_bf16 = the "
                "MoleGrad modes with standard's precision",
        "choices": ("custom", *MEMORY_MODES)})

    def validate(self) -> None:
        super().validate()
        with flag_errors(self):
            check_options(self.molegrad_rank_k, self.molegrad_power_iters, self.molegrad_warm_start_decay, prefix="molegrad_")
            check_memory_options(self.memory_options())
            check_precision_options(**self.precision_options())

    def molegrad_on(self) -> bool:
        """Whether these flags train with MoleGrad: --molegrad, or a --memory_mode preset that does
        not set molegrad=False."""
        return self.molegrad or (self.memory_mode != "custom" and MEMORY_MODES[self.memory_mode].get("molegrad", True))

    def preset(self) -> dict[str, Any]:
        """The fields --memory_mode sets (none for custom); a flag set against the preset (not left
        at its default) is refused, naming both."""
        defaults = {f.name: f.default for f in dataclasses.fields(MemoryFlags)}
        preset = MEMORY_MODES.get(self.memory_mode, {})
        for name, value in preset.items():
            if getattr(self, name) not in (defaults[name], value):
                raise ConfigError(f"--{name}={getattr(self, name)}: contradicts --memory_mode={self.memory_mode}, "
                                  f"which sets {name}={value}")
        return preset

    def memory_options(self) -> dict[str, Any]:
        """GPTConfig's memory fields (gpt.MEMORY_OPTIONS) from these flags, the preset of
        --memory_mode applied."""
        preset = self.preset()
        options = {name: preset.get(name, getattr(self, name)) for name in MEMORY_OPTIONS}
        options["molegrad_rank_k"] = self.molegrad_rank_k if self.molegrad_on() else 0
        return options

    def precision_options(self) -> dict[str, str]:
        """setup_optimizers' precision options (precision.PRECISION_OPTIONS) from these flags, the
        preset of --memory_mode applied."""
        preset = self.preset()
        return {name: preset.get(name, getattr(self, name)) for name in PRECISION_OPTIONS}

    def model_options(self) -> dict[str, Any]:
        """The GPTConfig fields these flags set."""
        return self.memory_options()


@dataclass
class ModelFlags(MemoryFlags):
    """MemoryFlags and the recipe pieces (upstream nanochat, 2026; all off by default), which shape the
    weights: base_train chooses them, later stages keep their checkpoint's architecture."""

    layer_lambdas: bool = field(default=False, metadata={
        "help": "model: learnable per-layer residual and x0 (input embedding) lambdas"})
    smear_gate: bool = field(default=False, metadata={
        "help": "model: mix the previous token's embedding into each position through a learned gate"})
    backout: bool = field(default=False, metadata={
        "help": "model: subtract a learned share of the mid-depth residual before the final norm"})
    value_embeds: bool = field(default=False, metadata={
        "help": "model: gated per-token value embeddings on alternating layers; vocab x kv_dim parameters "
                "(and AdamW moments) per such layer"})

    def model_options(self) -> dict[str, Any]:
        return {**self.memory_options(), **{name: getattr(self, name) for name in RECIPE_PIECES}}


# The memory settings that the benches and the planner's --sweep_depths compare, each spelled once:
# name -> MemoryFlags overrides. An arm is a bench's flags with its setting's overrides applied
# (dataclasses.replace, then .memory_options()): MoleGrad at the flags' --molegrad_rank_k (a bench
# may name another rank as <setting>_k<rank>); the flags it leaves at their defaults keep the
# setting what its name says.
MEMORY_SETTINGS: dict[str, dict[str, Any]] = {
    "dense": {},
    "recompute_mlp": dict(recompute="mlp"),
    "recompute_block": dict(recompute="block"),
    "molegrad_ffn": dict(molegrad=True, molegrad_targets="ffn_only"),  # MoleGrad's defaults: MLP Linears, dense momentum
    "molegrad_ffn_lowrank": dict(molegrad=True, molegrad_targets="ffn_only", molegrad_momentum="lowrank"),
    "molegrad_all": dict(molegrad=True, molegrad_targets="all"),
    "molegrad_all_lowrank": dict(molegrad=True, molegrad_targets="all", molegrad_momentum="lowrank"),
    # each precision option alone (nanochat/precision.py)
    "bf16_weights": dict(param_dtype="bfloat16"),
    "bf16_weights_fp32_grads": dict(param_dtype="bfloat16", grad_dtype="float32"),
    "int8_states": dict(optim_state="int8"),
    **{mode: dict(memory_mode=mode) for mode in MEMORY_MODES},  # low, lowest, keep_h, standard, low_bf16, ...
}
