"""Does MoleGrad cost quality? Gap to dense vs training tokens, at the ranks a GPU run uses.

    python -m bench.molegrad_quality                      # ~2 h on 2 quiet CPU cores (2 runs at a time, 1 thread each)
    python -m bench.molegrad_quality --arms=dense_muon,dense_adamw,galore_k6,molegrad_k6,lowrank_k6,flagship_k6,flagship_k24,flagship_k64
                                                          # the committed results: the default arms + k = width / 4
    python -m bench.molegrad_quality --jobs=1 --arms=dense_muon,flagship_k6 --budget_fractions=0.1
    python -m bench.molegrad_quality --arms=dense_muon,standard,bf16,int8,lowrank_k6,lowbf16_k6 \
        --out=bench/results/precision_quality.json        # issue 25's arms: the precision options

The model: one block of width 256 (786k block parameters), 4 heads of 64, context 256, its own
BPE tokenizer of --vocab_size 2048 trained on the corpus (a small vocabulary keeps the LM head
from dominating the step on CPU). MoleGrad rank k = 6 is k/in = 1/43 for c_q, c_k, c_v, c_fc and
1/171 for the MLP's c_proj: the ratios of k = 32 on a d20 GPU model (1/40 and 1/160); k = 24 is
the larger ratio (1/11, 1/43), k = 64 a width-proportional rank (width / 4: 1/4, 1/16).

Arms (--arms): dense_muon (base_train's recipe), dense_adamw (AdamW on the block matrices, to
separate optimizer from projection), galore_k{6,24} (GaLoreAdamW on the block matrices at the
same rank, refresh gap = 1/8 of the run, projector built from the first non-zero gradient: c_proj
starts at zero, so the other matrices' first gradients are exactly 0 and are skipped, not
projected), molegrad_k{6,24} (today's default: MoleGrad on the MLP Linears, dense momentum),
flagship_k{6,24,64} (--memory_mode=lowest's optimizer: every Linear compressed, low-rank momentum
with its step-size rule; recompute and keep-h are exact, so they do not change quality),
lowrank_k6 (the MLP Linears with low-rank momentum: which half of the flagship costs quality,
its attention compression or its low-rank momentum). Issue 26's arms, each the flagship with one
change, at k6 and k24: ffnv_k* (--molegrad_targets=ffn_v: the MLP Linears and c_v compressed, q, k
and the attention output dense; tests H1/H3, that q/k/o need what the inputs' principal subspace
drops), unbiased_k* (--molegrad_subspace=unbiased: k - k//2 principal + k//2 random directions,
rescaled to an unbiased gradient; tests H2 and H4, bias and a frozen subspace), gradient_k*
(--molegrad_subspace=gradient: the subspace follows the weight gradient's second moment as well,
from random probes; tests H1). Issue 25's arms, the precision options of nanochat/precision.py
(Muon, as dense_muon): standard (--memory_mode=standard, the practitioner's stack: bf16 weights
updated with stochastic rounding, 8-bit optimizer states, and block recompute, which is exact),
each option alone, bf16 (bf16 weights) and int8 (8-bit states), and lowbf16_k*
(--memory_mode=low_bf16: MoleGrad's low with standard's precision; lowrank_k* is low in fp32,
recompute aside). Low-rank arms run the default dense-norm step rule (LOWRANK_STEP_RULE below);
the JSON gives each arm's `unit_rule_lr` = lr x r, the unit rule's equivalent. No arm clips gradients (a compressed gradient's norm is only its captured part, so clipping
would fire differently per arm).

Budgets: the largest is --tokens_per_param tokens per block parameter (default 10), the others
--budget_fractions of it. LR: each arm sweeps --lr_multipliers (8x range) around its base LR at
the smallest budget, extended by a factor 2 past an edge while the best LR is that edge (at most
twice per side); the LR with the best bits per byte on the SELECTION split (val shard, first
--eval_tokens tokens) is used for the larger budgets; every reported number is on the HELD-OUT
split (the next --eval_tokens tokens, disjoint). Seeds (model init): --seeds at the largest
budget, one at the others; mean and spread (max - min) are reported.

Per arm: held-out val bpb, gap to dense Muon (%), captured gradient energy (share of the dense
dW's energy the compressed update sees; bench/runner.py's probe), subspace diagnostics (MoleGrad
arms: at every probe, per layer type q, k, v, attn_proj, mlp_fc, mlp_proj, the captured share
against the gradient's own top-k share, Q's overlap with D's top-k and with itself --overlap_delta
steps earlier, per-head shares for attn_proj: bench/runner.py's layer_diagnostics; the JSON keeps
every run's, the arm's entry its largest-budget seed-0 series, plotted beside the results as
<out>_diagnostics.png), median step time, training
FLOPs per token (6N + attention for dense layers; for a compressed (out, in) layer 4·out·in for
forward and dX plus 2k(in + out) for x Q and the factor and 2·in·(k + scouts) for its sketch),
optimizer-state bytes of the block matrices, and val bpb at equal FLOPs: dense Muon's curve
(log FLOPs, bpb), interpolated at the arm's largest-budget FLOPs.

Resumable: every finished run is appended to --out (default bench/results/molegrad_quality.json)
at once, with the git revision it ran at; a rerun with the same config skips what is there. The JSON also holds the exact command,
git revision and diff stat, machine, load averages and versions; a PNG (gap vs tokens, one line
per arm) goes next to it. Table, goals, then one JSON line.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bench.runner import (
    LAYER_TYPES,
    REPO,
    TokenData,
    dense_gradients,
    dense_twin,
    drive,
    init_worker,
    load_results,
    make_pool,
    mean_energy,
    molegrad_bases,
    prepare_data,
    print_goals,
    provenance,
    run_in_worker,
    subspace_diagnostics,
    write_json,
)
from nanochat.common import RunContext, print0, run_main
from nanochat.config import ConfigError, Flags, UserError, check, parse_args
from nanochat.gpt import BLOCK_LINEARS, GPT, GPTConfig
from nanochat.loss_eval import evaluate_bpb
from nanochat.memory import read_model
from nanochat.memory import state_bytes as momentum_state_bytes
from nanochat.molegrad import MoleGradLinear
from nanochat.optim import get_lr_multiplier, get_muon_momentum, lowrank_step_scale, setup_optimizers
from nanochat.model_flags import MEMORY_SETTINGS, MemoryFlags
from nanochat.trainer import train_step

DEFAULT_OUT = REPO / "bench" / "results" / "molegrad_quality.json"
# arm family -> (optimizer family, memory setting: model_flags.MEMORY_SETTINGS, at the arm's rank[, MemoryFlags overrides])
FAMILIES = {
    "dense_muon": ("muon", "dense"),
    "dense_adamw": ("adamw", "dense"),
    "galore": ("galore", "dense"),
    "molegrad": ("muon", "molegrad_ffn"),
    "flagship": ("muon", "molegrad_all_lowrank"),
    "lowrank": ("muon", "molegrad_ffn_lowrank"),  # which half of the flagship costs
    # issue 26: the flagship with one change each
    "ffnv": ("muon", "molegrad_all_lowrank", {"molegrad_targets": "ffn_v"}),
    "unbiased": ("muon", "molegrad_all_lowrank", {"molegrad_subspace": "unbiased"}),
    "gradient": ("muon", "molegrad_all_lowrank", {"molegrad_subspace": "gradient"}),
    # issue 25: the precision options, in the practitioner's stack, alone, and with MoleGrad's low
    "standard": ("muon", "standard"),
    "bf16": ("muon", "bf16_weights"),
    "int8": ("muon", "int8_states"),
    "lowbf16": ("muon", "low_bf16"),
}
UNRANKED = ("dense_muon", "dense_adamw", "standard", "bf16", "int8")  # the arms without a rank: no MoleGrad, no GaLore
# Low-rank momentum arms run the product's default step rule, pinned so that the results stay
# comparable if the default changes; `unit_rule_lr` in the JSON is lr x r, the unit rule's equivalent
# (exact here: no weight decay).
LOWRANK_STEP_RULE = "dense_norm"
BASE_LR = {"muon": 0.02, "adamw": 0.002, "galore": 0.01}  # the sweep's centre per optimizer family


@dataclass
class QualityConfig(Flags):
    """MoleGrad's quality against dense Muon, dense AdamW and GaLore, vs tokens, at GPU-like k/in."""

    arms: str = field(default="dense_muon,dense_adamw,galore_k6,molegrad_k6,lowrank_k6,flagship_k6,flagship_k24", metadata={
        "help": "comma-separated: dense_muon, dense_adamw, standard, bf16, int8, or "
                "galore|molegrad|lowrank|flagship|ffnv|unbiased|gradient|lowbf16_k<rank>"})
    n_embd: int = field(default=256, metadata={"help": "model width"})
    n_layer: int = field(default=1, metadata={"help": "transformer blocks"})
    n_head: int = field(default=4, metadata={"help": "attention heads"})
    seq_len: int = field(default=256, metadata={"help": "tokens per row"})
    batch_size: int = field(default=16, metadata={"help": "rows per optimizer step"})
    vocab_size: int = field(default=2048, metadata={"help": "the bench's own tokenizer, trained on the corpus"})
    tokenizer_chars: int = field(default=5_000_000, metadata={"help": "corpus characters its tokenizer trains on"})
    tokens_per_param: float = field(default=10.0, metadata={"help": "largest budget: tokens per block parameter"})
    budget_fractions: str = field(default="0.111,0.333", metadata={"help": "the smaller budgets, as fractions of the largest"})
    lr_multipliers: str = field(default="0.5,1,2,4", metadata={"help": "the LR sweep around each family's base LR"})
    seeds: int = field(default=2, metadata={"help": "model-init seeds at the largest budget"})
    eval_tokens: int = field(default=131072, metadata={"help": "tokens of the selection split, and of the held-out split"})
    energy_probes: int = field(default=4, metadata={"help": "captured-energy probes per run (0 = none); MoleGrad arms log their subspace diagnostics there"})
    overlap_delta: int = field(default=25, metadata={"help": "steps between the two subspaces whose overlap the diagnostics log"})
    galore_gap_fraction: float = field(default=0.125, metadata={"help": "GaLore's refresh gap as a fraction of the run"})
    galore_scale: float = field(default=0.25, metadata={"help": "GaLore's update scale"})
    jobs: int = field(default=2, metadata={"help": "runs at a time (each in its own process, 1 thread)"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype", "choices": ("auto", "float32", "bfloat16")})
    out: str = field(default=str(DEFAULT_OUT), metadata={"help": "results JSON (resumed when it exists); PNG beside it"})

    def validate(self) -> None:
        super().validate()
        for name in ("n_embd", "n_layer", "n_head", "seq_len", "batch_size", "seeds", "eval_tokens", "jobs", "overlap_delta"):
            check(getattr(self, name) >= 1, f"--{name}: expected >= 1, got {getattr(self, name)}")
        check(self.n_embd % self.n_head == 0 and (self.n_embd // self.n_head) % 2 == 0,
              f"--n_head: expected a divisor of --n_embd={self.n_embd} giving an even head size, got {self.n_head}")
        check(self.tokens_per_param > 0, f"--tokens_per_param: expected > 0, got {self.tokens_per_param}")
        check(all(0 < f < 1 for f in self.fractions()), f"--budget_fractions: expected values in (0, 1), got {self.budget_fractions}")
        check(len(self.multipliers()) >= 2 and max(self.multipliers()) / min(self.multipliers()) >= 8,
              f"--lr_multipliers: expected at least 2 values spanning >= 8x, got {self.lr_multipliers}")
        check(0 < self.galore_gap_fraction <= 1, f"--galore_gap_fraction: expected a value in (0, 1], got {self.galore_gap_fraction}")
        for arm in self.arm_names():
            family, rank = parse_arm(arm)
            check(rank <= self.n_embd, f"--arms: {arm} needs rank {rank} <= --n_embd={self.n_embd}")
            try:
                model_config(self, arm, self.vocab_size)
            except ValueError as e:
                raise ConfigError(f"--arms: {arm}: {e}") from None

    def arm_names(self) -> list[str]:
        return [arm for arm in self.arms.split(",") if arm]

    def fractions(self) -> list[float]:
        return sorted(float(f) for f in self.budget_fractions.split(",") if f)

    def multipliers(self) -> list[float]:
        return sorted(float(m) for m in self.lr_multipliers.split(",") if m)


def parse_arm(arm: str) -> tuple[str, int]:
    """'flagship_k6' -> ('flagship', 6); 'dense_muon' -> ('dense_muon', 0). Unknown: UserError."""
    if arm in UNRANKED:
        return arm, 0
    family, _, rank = arm.rpartition("_k")
    if family not in FAMILIES or family in UNRANKED or not rank.isdigit() or int(rank) < 1:
        raise ConfigError(f"--arms: unknown arm {arm!r}; expected {', '.join(UNRANKED)} or "
                          f"{'|'.join(f for f in FAMILIES if f not in UNRANKED)}_k<rank>")
    return family, int(rank)


def arm_flags(arm: str) -> MemoryFlags:
    """The arm's memory flags: its family's memory setting (model_flags.MEMORY_SETTINGS) at its rank.
    .memory_options() build its model, .precision_options() its optimizers."""
    family, rank = parse_arm(arm)
    setting, *overrides = FAMILIES[family][1:]
    return replace(MemoryFlags(), **{**MEMORY_SETTINGS[setting], **(overrides[0] if overrides else {})},
                   **({"molegrad_rank_k": rank} if rank else {}))


def model_config(cfg: QualityConfig, arm: str, vocab_size: int) -> GPTConfig:
    return GPTConfig(sequence_len=cfg.seq_len, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     n_kv_head=cfg.n_head, n_embd=cfg.n_embd, **arm_flags(arm).memory_options())


def block_params(config: GPTConfig) -> int:
    """Parameters of the blocks' Linears (nanochat.memory.read_model: the model's own shapes)."""
    return config.n_layer * sum(out * inp for out, inp in read_model(config).linears.values())


def budgets(cfg: QualityConfig) -> list[int]:
    """Optimizer steps of each budget, smallest first."""
    largest = max(2, round(cfg.tokens_per_param * block_params(model_config(cfg, "dense_muon", 2)) / (cfg.batch_size * cfg.seq_len)))
    return [max(2, round(f * largest)) for f in cfg.fractions()] + [largest]


# ---------------------------------------------------------------------------------------------
# FLOPs and optimizer state (the shapes: nanochat.memory.read_model; each MoleGrad layer's rank,
# tracked width t (principal columns + scouts) and probes: the layer itself, built on the meta device)

def compressed_linears(config: GPTConfig) -> dict[str, MoleGradLinear]:
    """Block Linear name -> its MoleGradLinear in GPT(config) built on the meta device (no values)."""
    with torch.device("meta"):
        block = GPT(config).transformer.h[0]
    return {name: block.get_submodule(name) for name in BLOCK_LINEARS if isinstance(block.get_submodule(name), MoleGradLinear)}


def training_flops_per_token(config: GPTConfig) -> float:
    """Forward + backward FLOPs per token (module docstring): GPT.estimate_flops' 6N + attention,
    with each compressed Linear's dense dW (2·out·in) replaced by MoleGrad's work; the gradient
    variant's probes add 2·t·(out + in) in backward (G R and xᵀ (G R))."""
    model = read_model(config)
    dense_linears = 6 * sum(o * i for o, i in model.linears.values()) * config.n_layer
    attention = 12 * config.n_layer * config.n_head * config.head_dim * config.sequence_len
    total = dense_linears + 6 * config.n_embd * config.vocab_size + attention
    for name, layer in compressed_linears(config).items():
        out, inp = model.linears[name]
        k, tracked = layer.rank_k, layer.sketch.shape[1]
        probes = 2 * tracked * (out + inp) if layer.probes is not None else 0
        total += config.n_layer * (-2 * out * inp + 2 * k * (inp + out) + 2 * inp * tracked + probes)
    return float(total)


def state_bytes(config: GPTConfig, family: str, rank: int, optim_state: str = "float32") -> int:
    """Optimizer state of the block matrices: Muon momentum (out, in), or (out, k) low-rank momentum,
    in fp32 or 8-bit (optim_state: nanochat.memory.state_bytes); MoleGrad's fp32 Q (in, k), sketch
    (in, t) and the gradient variant's probes (out, t); AdamW's two fp32 moments; GaLore's two moments
    of the projected gradient (rank r) and its projector."""
    model = read_model(config)
    compressed = compressed_linears(config)
    fp32_values, momenta = 0, []  # momenta: the numel of each Muon momentum
    for name, (out, inp) in model.linears.items():
        if family == "adamw":
            fp32_values += 2 * out * inp
        elif family == "galore":  # proj_type "std": the smaller side is projected
            r = min(rank, out, inp)
            fp32_values += 2 * out * r + r * inp if out >= inp else 2 * r * inp + out * r
        elif name in compressed:
            layer = compressed[name]
            momenta.append(out * layer.rank_k if config.molegrad_momentum == "lowrank" else out * inp)
            fp32_values += layer.Q.numel() + layer.sketch.numel() + (layer.probes.numel() if layer.probes is not None else 0)
        else:
            momenta.append(out * inp)
    return config.n_layer * (4 * fp32_values + sum(momentum_state_bytes(numel, optim_state) for numel in momenta))


# ---------------------------------------------------------------------------------------------
# optimizers

def make_galore(model: GPT, lr: float, rank: int, gap: int, scale: float) -> torch.optim.Optimizer:
    """GaLoreAdamW over the block matrices whose projector is built from the first non-zero
    gradient of each matrix: an all-zero gradient (c_q, c_k, c_v, c_fc before c_proj has moved
    from its zero init) is dropped before the step, so GaLore neither steps nor projects it."""
    try:
        from galore_torch import GaLoreAdamW
    except ImportError:
        raise UserError("galore-torch is not installed: pip install -e '.[bench]' (the bench extra)") from None

    class GaLoreFromFirstGradient(GaLoreAdamW):
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None and not bool(p.grad.any()):
                        p.grad = None
            return super().step(closure)

    matrices = [p for p in model.transformer.h.parameters()]
    return GaLoreFromFirstGradient([{"params": matrices, "rank": rank, "update_proj_gap": gap, "scale": scale,
                                     "proj_type": "std"}], lr=lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                                   no_deprecation_warning=True)


def make_optimizers(model: GPT, arm: str, lr: float, steps: int, cfg: QualityConfig,
                    seed: int = 0) -> list[torch.optim.Optimizer]:
    """base_train's AdamW for the embedding and head in every arm; the block matrices get Muon at
    matrix_lr = lr (dense and MoleGrad arms), AdamW at lr, or GaLore at lr. The arm's precision
    options apply (seed: the stochastic rounding's bits, the run's seed)."""
    family, rank = parse_arm(arm)
    optimizers = setup_optimizers(model, matrix_lr=lr, lowrank_step_rule=LOWRANK_STEP_RULE,
                                  **arm_flags(arm).precision_options(), seed=seed)
    kind = family_kind(arm)
    if kind == "muon":
        return optimizers
    if kind == "adamw":
        blocks = torch.optim.AdamW(model.transformer.h.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)
    else:
        blocks = make_galore(model, lr, rank, max(1, round(cfg.galore_gap_fraction * steps)), cfg.galore_scale)
    for group in blocks.param_groups:
        group["initial_lr"] = group["lr"]
    return [optimizers[0], blocks]


def family_kind(arm: str) -> str:
    family, _ = parse_arm(arm)
    return "adamw" if family == "dense_adamw" else FAMILIES[family][0]


# ---------------------------------------------------------------------------------------------
# one run

@dataclass(frozen=True)
class RunSpec:
    arm: str
    steps: int
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.arm}|{self.steps}|{self.lr:.6g}|{self.seed}"


def train_run(spec: RunSpec, data: TokenData, cfg: QualityConfig, ctx: RunContext) -> dict[str, Any]:
    """spec.steps optimizer steps from the seeded init; bpb on both splits, step times, energy, and
    for MoleGrad arms the subspace diagnostics at every probe (each against Q --overlap_delta steps
    earlier, or at step 0 for a probe before that)."""
    config = model_config(cfg, spec.arm, data.vocab_size)
    torch.manual_seed(spec.seed)
    model = GPT(config)
    optimizers = make_optimizers(model, spec.arm, spec.lr, spec.steps, cfg, spec.seed)
    probed = config.molegrad_rank_k > 0 or spec.arm.startswith("galore")
    twin = dense_twin(config) if probed and cfg.energy_probes else None
    probe_every = max(1, spec.steps // cfg.energy_probes) if cfg.energy_probes else 0
    probe_steps = {s for s in range(spec.steps) if s % probe_every == probe_every - 1} if twin is not None else set()
    earlier_step = {s: max(0, s - cfg.overlap_delta) for s in probe_steps}
    bases: dict[int, dict[str, torch.Tensor]] = {}  # step -> each MoleGrad layer's Q before that step
    train = data.batches(data.train[:spec.steps])
    times, energies, diagnostics, finite = [], [], [], True
    t_start = time.perf_counter()
    for step, batch in enumerate(train):
        if config.molegrad and step in earlier_step.values():
            bases[step] = molegrad_bases(model)
        if step in probe_steps:
            gradients = dense_gradients(model, twin, batch, ctx)
            energy = mean_energy(model, gradients, optimizers)
            if energy is not None:
                energies.append(energy)
            if config.molegrad:
                diagnostics.append({"step": step, "delta": step - earlier_step[step],
                                    "layers": subspace_diagnostics(model, gradients, bases[earlier_step[step]])})
        t0 = time.perf_counter()
        loss, _ = train_step(model, optimizers, iter([batch]), 1, ctx, get_lr_multiplier(step, spec.steps),
                             get_muon_momentum(step), grad_clip=0.0)
        times.append(time.perf_counter() - t0)
        if not math.isfinite(loss):
            finite = False
            break

    def bpb(rows: torch.Tensor) -> float:
        batches = data.batches(rows)
        return evaluate_bpb(model, iter(batches), len(batches), data.token_bytes, ctx) if finite else math.inf

    return {"key": spec.key, **asdict(spec), "tokens": spec.steps * cfg.batch_size * cfg.seq_len,
            "selection_bpb": bpb(data.selection), "heldout_bpb": bpb(data.heldout),
            "step_s": statistics.median(times[1:] or times), "energy": statistics.mean(energies) if energies else None,
            **({"diagnostics": diagnostics} if config.molegrad else {}), "seconds": time.perf_counter() - t_start}


# ---------------------------------------------------------------------------------------------
# the plan: LR sweep at the smallest budget, then the chosen LR at every budget

MAX_EDGE_EXTENSIONS = 2  # extra LRs (each a factor 2 further out) when the best is at an edge of the sweep


def sweep_specs(cfg: QualityConfig, arm: str, runs: dict[str, dict[str, Any]] | None = None) -> list[RunSpec]:
    """The arm's LR sweep at the smallest budget: --lr_multipliers of its family's base LR, and,
    while the best LR on the selection split is the lowest (highest) one swept, one more at half
    (double) that, up to MAX_EDGE_EXTENSIONS per side, so the reported LR is not an edge of the grid."""
    base = BASE_LR[family_kind(arm)]
    multipliers = cfg.multipliers()
    runs = runs or {}
    for side in (0, -1):
        for _ in range(MAX_EDGE_EXTENSIONS):
            sweep = [runs.get(RunSpec(arm, budgets(cfg)[0], base * m, 0).key) for m in multipliers]
            if any(run is None for run in sweep):
                break
            best = min(range(len(sweep)), key=lambda i: sweep[i]["selection_bpb"])
            if best != (side % len(sweep)):
                break
            multipliers = [multipliers[0] / 2] + multipliers if side == 0 else multipliers + [multipliers[-1] * 2]
    return [RunSpec(arm, budgets(cfg)[0], base * m, 0) for m in multipliers]


def chosen_lr(runs: dict[str, dict[str, Any]], cfg: QualityConfig, arm: str) -> float | None:
    """The LR of the arm's sweep with the lowest SELECTION-split bpb (None until the sweep, its
    edge extensions included, is done)."""
    sweep = [runs.get(spec.key) for spec in sweep_specs(cfg, arm, runs)]
    if any(run is None for run in sweep):
        return None
    return min(sweep, key=lambda run: run["selection_bpb"])["lr"]


def needed_specs(runs: dict[str, dict[str, Any]], cfg: QualityConfig) -> list[RunSpec]:
    """Every run the results so far call for: each arm's sweep, and its budgets once its LR is chosen."""
    specs = []
    for arm in cfg.arm_names():
        specs += sweep_specs(cfg, arm, runs)
        lr = chosen_lr(runs, cfg, arm)
        if lr is not None:
            specs += final_specs(cfg, arm, lr)
    return specs


def final_specs(cfg: QualityConfig, arm: str, lr: float) -> list[RunSpec]:
    steps = budgets(cfg)
    return [RunSpec(arm, s, lr, 0) for s in steps[:-1]] + [RunSpec(arm, steps[-1], lr, seed) for seed in range(cfg.seeds)]


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of y at x on points sorted by x (log FLOPs vs bpb); None outside."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y0
    return None


def summarize(runs: dict[str, dict[str, Any]], cfg: QualityConfig, vocab_size: int) -> dict[str, Any]:
    """Per arm: chosen LR, per-budget held-out bpb (mean, spread over seeds), gap to dense Muon,
    energy, step time, FLOPs per token, state bytes, bpb at dense Muon's FLOPs."""
    arms: dict[str, Any] = {}
    for arm in cfg.arm_names():
        lr = chosen_lr(runs, cfg, arm)
        config = model_config(cfg, arm, vocab_size)
        flops = training_flops_per_token(config)
        precision = arm_flags(arm).precision_options()
        entry: dict[str, Any] = {"lr": lr, "lr_sweep": {}, "flops_per_token": flops, "precision": precision,
                                 "state_bytes": state_bytes(config, family_kind(arm), parse_arm(arm)[1], precision["optim_state"]),
                                 "budgets": {}}
        for spec in sweep_specs(cfg, arm, runs):
            if spec.key in runs:
                entry["lr_sweep"][f"{spec.lr:.6g}"] = {"selection_bpb": runs[spec.key]["selection_bpb"],
                                                       "heldout_bpb": runs[spec.key]["heldout_bpb"]}
        lowrank = config.molegrad_momentum == "lowrank"
        # the same steps under the unit rule (r = 1): every Linear here has min(out, in) = n_embd
        entry["unit_rule_lr"] = (lr * lowrank_step_scale(cfg.n_embd, cfg.n_embd, config.molegrad_rank_k, LOWRANK_STEP_RULE)
                                 if lowrank and lr is not None else lr)
        if lr is not None:
            swept = [spec.lr for spec in sweep_specs(cfg, arm, runs)]
            entry["lr_at_edge_of_sweep"] = lr in (min(swept), max(swept))
            done = [runs[s.key] for s in final_specs(cfg, arm, lr) if s.key in runs]
            for steps in budgets(cfg):
                seeds = [r["heldout_bpb"] for r in done if r["steps"] == steps]
                if seeds:
                    entry["budgets"][str(steps)] = {"tokens": steps * cfg.batch_size * cfg.seq_len, "seeds": seeds,
                                                    "heldout_bpb": statistics.mean(seeds), "spread": max(seeds) - min(seeds)}
            energies = [r["energy"] for r in done if r["energy"] is not None]
            entry["energy"] = statistics.mean(energies) if energies else None
            entry["diagnostics"] = diagnostics_series(done)
            entry["step_s"] = statistics.median([r["step_s"] for r in done]) if done else None
        arms[arm] = entry
    dense = arms.get("dense_muon")
    for arm, entry in arms.items():
        for steps, point in entry["budgets"].items():
            reference = dense["budgets"].get(steps) if dense else None
            point["gap_pct"] = 100 * (point["heldout_bpb"] / reference["heldout_bpb"] - 1) if reference else None
        entry["bpb_vs_dense_at_equal_flops_pct"] = None
        if dense and entry["budgets"] and len(dense["budgets"]) >= 2:
            curve = [(math.log(p["tokens"] * dense["flops_per_token"]), p["heldout_bpb"]) for p in dense["budgets"].values()]
            largest = entry["budgets"][max(entry["budgets"], key=int)]
            at = interpolate(curve, math.log(largest["tokens"] * entry["flops_per_token"]))
            if at is not None:
                entry["bpb_vs_dense_at_equal_flops_pct"] = 100 * (largest["heldout_bpb"] / at - 1)
    return arms


def diagnostics_series(done: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The arm's subspace diagnostics over training: those of its largest-budget run, seed 0 (None:
    not a MoleGrad arm, or runs from before the diagnostics)."""
    logged = [run for run in done if run.get("diagnostics")]
    if not logged:
        return None
    run = max(logged, key=lambda r: (r["steps"], -r["seed"]))
    return {"steps": run["steps"], "seed": run["seed"], "probes": run["diagnostics"]}


def goals(arms: dict[str, Any], cfg: QualityConfig) -> dict[str, bool | None]:
    """The issue's goals on these numbers (None: an arm or budget they need is missing)."""
    steps = [str(s) for s in budgets(cfg)]
    flagship = next((a for a in cfg.arm_names() if a.startswith("flagship_")), None)
    galore = next((a for a in cfg.arm_names() if a.startswith("galore_")), None)

    def gap(arm: str | None, budget: str) -> float | None:
        point = arms.get(arm, {}).get("budgets", {}).get(budget) if arm else None
        return point.get("gap_pct") if point else None

    def heldout(arm: str | None) -> float | None:
        point = arms.get(arm, {}).get("budgets", {}).get(steps[-1]) if arm else None
        return point["heldout_bpb"] if point else None

    def within(arm: str, limit: float) -> dict[str, bool | None]:
        largest, middle = gap(arm, steps[-1]), gap(arm, steps[-2]) if len(steps) > 1 else None
        return {f"{arm} within +{limit:g}% of dense Muon at the largest budget": None if largest is None else largest <= limit,
                f"{arm}'s gap not growing from the middle to the largest budget":
                    None if largest is None or middle is None else largest <= middle}

    result: dict[str, bool | None] = {}
    if flagship:
        equal_flops = arms.get(flagship, {}).get("bpb_vs_dense_at_equal_flops_pct")
        same_rank_galore = f"galore_k{parse_arm(flagship)[1]}"
        galore = same_rank_galore if same_rank_galore in arms else galore
        result |= within(flagship, 2.0) | {
            f"{flagship} at least as good as dense Muon at equal FLOPs": None if equal_flops is None else equal_flops <= 0.0,
            f"{flagship} better than {galore} at the largest budget": None if heldout(flagship) is None or heldout(galore) is None
            else heldout(flagship) < heldout(galore),
        }
    # issue 25: the practitioner's stack within +1% of fp32 dense, MoleGrad's low with its precision within +2%
    for arm in cfg.arm_names():
        if arm == "standard" or arm.startswith("lowbf16_"):
            result |= within(arm, 1.0 if arm == "standard" else 2.0)
    return result


# ---------------------------------------------------------------------------------------------
# output

def plot(arms: dict[str, Any], path: Path) -> Path | None:
    from nanochat.report import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm, entry in arms.items():
        points = sorted((p["tokens"], p["gap_pct"], p["spread"]) for p in entry["budgets"].values() if p.get("gap_pct") is not None)
        if arm == "dense_muon" or not points:
            continue
        tokens, gaps, spreads = zip(*points)
        ax.errorbar(tokens, gaps, yerr=[100 * s / max(1e-9, entry["budgets"][max(entry["budgets"], key=int)]["heldout_bpb"]) / 2
                                        for s in spreads], marker="o", capsize=3, label=arm)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out val bpb gap to dense Muon (%)")
    ax.set_title("MoleGrad quality vs tokens (CPU bench, 1 block, width 256)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_diagnostics(arms: dict[str, Any], path: Path) -> Path | None:
    """One row per MoleGrad arm: per layer type vs step, the captured share of the dense gradient
    (solid) and the gradient's own top-k share (dashed); Q's overlap with itself --overlap_delta steps
    earlier; attention c_proj's per-head captured share and share of dW at the last probe."""
    from nanochat.report import pyplot

    series = {arm: entry["diagnostics"] for arm, entry in arms.items() if entry.get("diagnostics")}
    if not series:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(series), 3, figsize=(13, 3.0 * len(series)), squeeze=False)
    colors = dict(zip(LAYER_TYPES.values(), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for row, (arm, diagnostics) in zip(axes, series.items()):
        probes = diagnostics["probes"]
        for kind, color in colors.items():
            points = [(probe["step"] + 1, probe["layers"][kind]) for probe in probes if kind in probe["layers"]]
            if not points:
                continue
            steps = [step for step, _ in points]
            row[0].plot(steps, [m["captured"] for _, m in points], "-o", color=color, markersize=3, label=kind)
            row[0].plot(steps, [m["optimal"] for _, m in points], "--", color=color)
            overlaps = [(step, m["self_overlap"]) for step, m in points if m["self_overlap"] is not None]
            if overlaps:
                row[1].plot(*zip(*overlaps), "-o", color=color, markersize=3, label=kind)
        heads = probes[-1]["layers"].get("attn_proj") if probes else None
        if heads:
            index = range(len(heads["head_share"]))
            row[2].bar([i - 0.2 for i in index], [c if c is not None else math.nan for c in heads["head_captured"]],
                       0.4, label="captured share of the head's dW")
            row[2].bar([i + 0.2 for i in index], heads["head_share"], 0.4, label="head's share of dW")
            row[2].set_xticks(list(index))
            row[2].legend(fontsize=7)
        else:
            row[2].text(0.5, 0.5, "attention c_proj not compressed", ha="center", transform=row[2].transAxes)
        row[0].set_ylabel(f"{arm}\n(steps {diagnostics['steps']})")
        for ax, title in zip(row, ("captured (solid) vs top-k optimum (dashed)", "overlap with Q some steps earlier",
                                   "attn c_proj per head, last probe")):
            ax.set_title(title, fontsize=9)
            ax.set_ylim(0, 1.05)
        row[0].legend(fontsize=7)
    for ax in axes[-1][:2]:
        ax.set_xlabel("training step")
    axes[-1][2].set_xlabel("head")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def print_diagnostics(arms: dict[str, Any]) -> None:
    """Per MoleGrad arm, at its last probe: captured / top-k optimum, and the self overlap, per layer type."""
    for arm, entry in arms.items():
        probes = (entry.get("diagnostics") or {}).get("probes")
        if not probes:
            continue
        parts = []
        for kind, m in probes[-1]["layers"].items():
            overlap = f"{m['self_overlap']:.2f}" if m["self_overlap"] is not None else "-"
            parts.append(f"{kind} {m['captured']:.2f}/{m['optimal']:.2f} ov {overlap}")
        print0(f"  {arm:<14} step {probes[-1]['step'] + 1}: " + ", ".join(parts))


def tokens_text(tokens: int) -> str:
    return f"{tokens / 1e6:.1f}M" if tokens >= 1e6 else f"{tokens / 1e3:.0f}k" if tokens >= 1e3 else str(tokens)


def print_table(arms: dict[str, Any], cfg: QualityConfig) -> None:
    steps = [str(s) for s in budgets(cfg)]
    header = f"{'arm':<14}{'lr':>8}{'GFLOP/tok':>10}{'state MB':>9}{'step s':>8}{'energy':>7}"
    header += "".join(f"{'bpb@' + tokens_text(int(s) * cfg.batch_size * cfg.seq_len):>13}{'gap':>7}" for s in steps)
    print0(header + f"{'eqFLOPs':>9}")
    for arm, e in arms.items():
        line = f"{arm:<14}{(e['lr'] or float('nan')):>8.4f}{e['flops_per_token'] / 1e9:>10.4f}{e['state_bytes'] / 1e6:>9.2f}"
        line += f"{(e.get('step_s') or float('nan')):>8.3f}" + (f"{e['energy']:>7.2f}" if e.get("energy") is not None else f"{'-':>7}")
        for s in steps:
            p = e["budgets"].get(s)
            line += (f"{p['heldout_bpb']:>8.4f}±{p['spread'] / 2:<4.3f}" + (f"{p['gap_pct']:>+6.1f}%" if p.get("gap_pct") is not None else f"{'-':>7}")) if p else f"{'-':>13}{'-':>7}"
        eq = e.get("bpb_vs_dense_at_equal_flops_pct")
        print0(line + (f"{eq:>+8.1f}%" if eq is not None else f"{'-':>9}"))


def run(cfg: QualityConfig, argv: list[str]) -> dict[str, Any]:
    out = Path(cfg.out)
    cache = out.with_suffix(".tokens.pt")
    runs = load_results(out, cfg, ignored=("arms", "jobs", "out"))
    started, load_before = time.strftime("%Y-%m-%dT%H:%M:%S"), os.getloadavg()
    data = prepare_data(cfg, cache, budgets(cfg)[-1])
    info = provenance(argv, "bench.molegrad_quality")

    def save() -> dict[str, Any]:
        arms = summarize(runs, cfg, data.vocab_size)
        result = {**info, "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "load_average_at_start": load_before, "load_average_now": os.getloadavg(), "config": asdict(cfg),
                  "budgets_steps": budgets(cfg), "block_params": block_params(model_config(cfg, "dense_muon", data.vocab_size)),
                  "vocab_size": data.vocab_size, "runs": sorted(runs.values(), key=lambda r: r["key"]), "arms": arms,
                  "goals": goals(arms, cfg)}
        write_json(out, result)
        return result

    print0(f"{len(runs)} runs found in {out}; budgets {budgets(cfg)} steps of {cfg.batch_size} x {cfg.seq_len} tokens; "
           f"{cfg.jobs} at a time")
    def finished(spec: RunSpec, result: dict[str, Any]) -> None:
        print0(f"  {spec.arm:<14} steps {spec.steps:>5} lr {spec.lr:<8.4g} seed {spec.seed}: held-out bpb "
               f"{result['heldout_bpb']:.4f} (selection {result['selection_bpb']:.4f}), {result['seconds']:.0f} s")
        save()

    with make_pool(cfg.jobs, init_worker, (QualityConfig, asdict(cfg), str(cache), budgets(cfg)[-1], train_run)) as pool:
        drive(pool, run_in_worker, lambda done: needed_specs(done, cfg), runs, info["git_revision"], finished)
    result = save()
    print_table(result["arms"], cfg)
    print0("subspace diagnostics (captured / gradient's own top-k share, overlap with Q --overlap_delta steps earlier):")
    print_diagnostics(result["arms"])
    print_goals(result["goals"])
    picture = plot(result["arms"], out.with_suffix(".png"))
    diagnostics = plot_diagnostics(result["arms"], out.with_name(out.stem + "_diagnostics.png"))
    print0(f"wrote {out} and {picture}" + (f" and {diagnostics}" if diagnostics else ""))
    print0(json.dumps({"bench": "molegrad_quality", "out": str(out), "arms": result["arms"], "goals": result["goals"]}))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(QualityConfig, argv, prog="python -m bench.molegrad_quality")
    return run_main(lambda cfg: run(cfg, argv), cfg)


if __name__ == "__main__":
    main()
