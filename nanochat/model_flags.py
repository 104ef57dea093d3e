"""The model and memory flags, declared once: every training stage, the memory planner and the
benches take these groups, and they alone turn flags into GPTConfig options.

- `MemoryFlags`: how a model trains within memory: exact recompute, MoleGrad (low-rank weight
  gradients, nanochat/molegrad.py) and `--memory_mode`, a preset of both (MEMORY_MODES). Every
  training stage takes it.
- `ModelFlags`: MemoryFlags and the four recipe pieces, which shape the weights; only base_train
  (and the planner) take it: later stages keep their checkpoint's architecture.

MEMORY_SETTINGS names the settings that the benches and the planner compare (dense, recompute_block,
molegrad_ffn, lowest, ...), each once.

Each flag is named like the GPTConfig field it sets; the seed's spellings (--enable_streaming,
--streaming_rank_k, --streaming_target_layers, --streaming_*) are aliases. MoleGrad is on when
`--molegrad` is, or a memory mode is chosen: `molegrad_on()`, the one place that says so. Value
checks live with the model (gpt.check_memory_options); `flag_errors()` names the flag in them.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from nanochat.config import ConfigError, Flags
from nanochat.gpt import MEMORY_OPTIONS, RECIPE_PIECES, RECOMPUTE_MODES, check_memory_options
from nanochat.molegrad import MOLEGRAD_MOMENTA, MOLEGRAD_TARGETS, check_options

# --memory_mode presets: each turns MoleGrad on (at --molegrad_rank_k) and sets these fields.
# lowest: the least memory per parameter (block recompute, every block Linear compressed, (out, k)
#   momentum, h kept inside the recompute); keep_h: no recompute, every Linear compressed, h kept, so
#   the MLP's backward does not recompute it and the dW matmuls shrink by in/k. low: lowest with only
#   the MLP Linears compressed: compressing attention is what costs quality at GPU-like k/in
#   (docs/molegrad.md), the MLP's low-rank momentum does not.
MEMORY_MODES = {
    "low": dict(recompute="block", molegrad_targets="ffn_only", molegrad_momentum="lowrank", molegrad_keep_h=False),
    "lowest": dict(recompute="block", molegrad_targets="all", molegrad_momentum="lowrank", molegrad_keep_h=False),
    "keep_h": dict(recompute="none", molegrad_targets="all", molegrad_momentum="lowrank", molegrad_keep_h=True),
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
    memory_mode: str = field(default="custom", metadata={
        "help": "custom = the flags above; low = recompute=block + MoleGrad on the MLP Linears + lowrank momentum "
                "(no measured quality cost); lowest = the same on all Linears (h kept inside the recompute; compressing "
                "attention costs quality at small k); keep_h = MoleGrad on all Linears + lowrank momentum + keep h, no "
                "recompute (each turns MoleGrad on, at --molegrad_rank_k)",
        "choices": ("custom", *MEMORY_MODES)})

    def validate(self) -> None:
        super().validate()
        with flag_errors():
            check_options(self.molegrad_rank_k, self.molegrad_power_iters, self.molegrad_warm_start_decay, prefix="molegrad_")
            check_memory_options(self.memory_options())

    def molegrad_on(self) -> bool:
        """Whether these flags train with MoleGrad: --molegrad, or any --memory_mode preset."""
        return self.molegrad or self.memory_mode != "custom"

    def memory_options(self) -> dict[str, Any]:
        """GPTConfig's memory fields (gpt.MEMORY_OPTIONS) from these flags, the preset of
        --memory_mode applied; a flag set against the preset (not left at its default) is refused."""
        options = {name: getattr(self, name) for name in MEMORY_OPTIONS}
        options["molegrad_rank_k"] = self.molegrad_rank_k if self.molegrad_on() else 0
        defaults = {f.name: f.default for f in dataclasses.fields(MemoryFlags)}
        for name, value in MEMORY_MODES.get(self.memory_mode, {}).items():  # custom: none
            if getattr(self, name) not in (defaults[name], value):
                raise ConfigError(f"--{name}={getattr(self, name)}: contradicts --memory_mode={self.memory_mode}, "
                                  f"which sets {name}={value}")
            options[name] = value
        return options

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
    **{mode: dict(memory_mode=mode) for mode in MEMORY_MODES},  # low, lowest, keep_h
}
