"""Which of the 2026 recipe pieces pay? Each screened against the current recipe, then the chosen
combination against it at >= 10 tokens per block parameter, 3 seeds, equal tokens, same data.

    python -m bench.recipe                     # ~40 min on 2 CPU cores (2 runs at a time, 1 thread each)
    python -m bench.recipe --jobs=1 --n_layer=2 --n_embd=64 --tokens_per_param=0.5 --seeds=1 --out=/tmp/r.json

"Current recipe" is base_train's defaults (its flag groups TrainFlags and ModelFlags: Muon with
Newton-Schulz, no weight decay, warmdown 0.2, grad clip 1.0, no model pieces, dense training). Each
arm changes only the flags it names:

  layer_lambdas  smear_gate  backout  value_embeds     the model pieces (docs/recipe.md)
  polar_express  normuon                               Muon's orthogonaliser / variance reduction
  weight_decay   (--weight_decay 0.28, upstream's value, plain decoupled decay)
  cautious_wd    (0.28, cautious)     wd_by_width (0.28, cautious, x (768/width)^2)
  auto_batch     (--total_batch_size=-1: the step size upstream's rule gives this model; same tokens, fewer steps)

The model: --n_layer 4 blocks of width 96 (442k block parameters; 4 layers so that the pieces
that act across depth, value embeddings on alternating layers, the x0 lambdas and backout, have
depth to act on), context 256, the bench's own BPE tokenizer of --vocab_size 2048 trained on the
corpus (bench/runner.py's data code, as bench/molegrad_quality.py: the same tokenizer, splits and cache format).
Every arm runs at base_train's default LRs: the screen asks whether a piece pays at the recipe's
settings, not after retuning (a piece that needs another LR shows up as a loss here).

Plan: every arm at the screen budget (--screen_fraction of the largest, seed 0). A piece joins the
combination when its SELECTION-split bpb beats the current recipe's by more than --min_gain_pct;
of the weight-decay arms (which nest) only the best that passes joins. Then the current recipe
and the combination each run the largest budget (--tokens_per_param tokens per block parameter)
with --seeds model-init seeds. Every reported bpb is on the HELD-OUT split (disjoint from the
selection split).

Per arm: held-out val bpb, gain vs current (%), tokens/s (a separate phase after the quality
runs, alone in one process: --speed_rounds rounds of every arm interleaved, --speed_threads
threads, median step; the load average is recorded with it), measured peak allocated bytes of a
training step at the bench size (tensor storage, nanochat.memory_measure.measure_allocated_peak), and the
planned peak at d20 and d26 at 8192 x 1 tokens (nanochat.memory.plan_memory, bf16, dense and
--memory_mode=lowest) so the memory price of value embeddings on a 32 GB card shows.

Resumable: each finished run is appended to --out (default bench/results/recipe.json) at once; a
rerun with the same settings skips it. The JSON holds the exact command, git revision, machine,
load averages and versions. Table, goals, then one JSON line.
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
    REPO,
    TokenData,
    drive,
    init_worker,
    load_results,
    make_pool,
    prepare_data,
    print_goals,
    provenance,
    run_in_worker,
    write_json,
)
from nanochat.common import RunContext, compute_init, print0, run_main
from nanochat.config import Flags, check, parse_args
from nanochat.gpt import GPT, GPTConfig, config_from_depth
from nanochat.loss_eval import evaluate_bpb
from nanochat.memory import plan_memory
from nanochat.memory_measure import measure_allocated_peak
from nanochat.model_flags import MEMORY_SETTINGS, ModelFlags
from nanochat.optim import get_lr_multiplier, get_muon_momentum, setup_optimizers
from nanochat.trainer import AUTO_BATCH_REF_DEPTH, TrainFlags, auto_total_batch_size, train_step

DEFAULT_OUT = REPO / "bench" / "results" / "recipe.json"
UPSTREAM_WEIGHT_DECAY = 0.28  # upstream nanochat's base_train default (cautious, for Muon's matrices)

# arm -> the flags (ArmFlags) it changes from base_train's defaults
ARMS: dict[str, dict[str, Any]] = {
    "current": {},
    "layer_lambdas": {"layer_lambdas": True},
    "smear_gate": {"smear_gate": True},
    "backout": {"backout": True},
    "value_embeds": {"value_embeds": True},
    "polar_express": {"muon_orthogonalizer": "polar_express"},
    "normuon": {"normuon": True},
    "weight_decay": {"weight_decay": UPSTREAM_WEIGHT_DECAY},
    "cautious_wd": {"weight_decay": UPSTREAM_WEIGHT_DECAY, "cautious_weight_decay": True},
    "wd_by_width": {"weight_decay": UPSTREAM_WEIGHT_DECAY, "cautious_weight_decay": True, "weight_decay_by_width": True},
    "auto_batch": {"total_batch_size": -1},
}
WEIGHT_DECAY_ARMS = ("weight_decay", "cautious_wd", "wd_by_width")  # nested: at most one joins
PLAN_DEPTHS = (20, 26)
# config fields a rerun may change and still resume from the results file
RESUMABLE = ("arms", "also_final", "jobs", "out", "measure_memory", "speed_rounds", "speed_steps", "speed_threads")
PLAN_SEQ_LEN, PLAN_VOCAB = 8192, 65536


@dataclass
class RecipeConfig(Flags):
    """The 2026 recipe pieces against the current recipe, at equal tokens on the same data."""

    arms: str = field(default=",".join(ARMS), metadata={"help": f"comma-separated, from: {', '.join(ARMS)}"})
    n_embd: int = field(default=96, metadata={"help": "model width"})
    n_layer: int = field(default=4, metadata={"help": "transformer blocks"})
    n_head: int = field(default=2, metadata={"help": "attention heads"})
    seq_len: int = field(default=256, metadata={"help": "tokens per row"})
    batch_size: int = field(default=16, metadata={"help": "rows per optimizer step (auto_batch: rows per micro-batch)"})
    vocab_size: int = field(default=2048, metadata={"help": "the bench's own tokenizer, trained on the corpus"})
    tokenizer_chars: int = field(default=5_000_000, metadata={"help": "corpus characters its tokenizer trains on"})
    tokens_per_param: float = field(default=10.0, metadata={"help": "largest budget: tokens per block parameter"})
    screen_fraction: float = field(default=0.25, metadata={"help": "the screen budget, as a fraction of the largest"})
    min_gain_pct: float = field(default=0.1, metadata={"help": "a piece joins the combination above this selection-split gain (%)"})
    seeds: int = field(default=3, metadata={"help": "model-init seeds at the largest budget"})
    eval_tokens: int = field(default=131072, metadata={"help": "tokens of the selection split, and of the held-out split"})
    measure_memory: bool = field(default=True, metadata={"help": "measure each arm's peak allocated bytes at the bench size"})
    speed_rounds: int = field(default=5, metadata={"help": "tokens/s phase after the quality runs: rounds of every arm, interleaved (0 = skip)"})
    speed_steps: int = field(default=4, metadata={"help": "timed optimizer steps per arm per round (after one warm-up step)"})
    speed_threads: int = field(default=2, metadata={"help": "threads of the tokens/s phase"})
    also_final: str = field(default="", metadata={"help": "comma-separated arms that also run the largest budget with every seed "
                                                          "(a single piece's own confirmation); a+b+c is those pieces together"})
    jobs: int = field(default=2, metadata={"help": "runs at a time (each in its own process, 1 thread)"})
    dtype: str = field(default="float32", metadata={"help": "compute dtype", "choices": ("float32", "bfloat16")})
    out: str = field(default=str(DEFAULT_OUT), metadata={"help": "results JSON (resumed when it exists)"})

    def validate(self) -> None:
        super().validate()
        for name in ("n_embd", "n_layer", "n_head", "seq_len", "batch_size", "seeds", "eval_tokens", "jobs"):
            check(getattr(self, name) >= 1, f"--{name}: expected >= 1, got {getattr(self, name)}")
        check(self.n_embd % self.n_head == 0 and (self.n_embd // self.n_head) % 2 == 0,
              f"--n_head: expected a divisor of --n_embd={self.n_embd} giving an even head size, got {self.n_head}")
        check(self.tokens_per_param > 0, f"--tokens_per_param: expected > 0, got {self.tokens_per_param}")
        check(0 < self.screen_fraction <= 1, f"--screen_fraction: expected a value in (0, 1], got {self.screen_fraction}")
        unknown = [arm for arm in self.arm_names() if arm not in ARMS]
        check(not unknown, f"--arms: unknown {unknown[0] if unknown else ''!r}; expected some of {', '.join(ARMS)}")
        check("current" in self.arm_names(), "--arms: must include current (every gain is measured against it)")
        bad = [arm for arm in self.also_final_arms() if any(part not in ARMS or part == "current" for part in arm.split("+"))]
        check(not bad, f"--also_final: unknown or current {bad[0] if bad else ''!r}; expected some of "
                       f"{', '.join(a for a in ARMS if a != 'current')}, or several joined by + (a combination)")

    def arm_names(self) -> list[str]:
        return [arm for arm in self.arms.split(",") if arm]

    def also_final_arms(self) -> list[str]:
        return [arm for arm in self.also_final.split(",") if arm]


@dataclass
class ArmFlags(ModelFlags, TrainFlags):
    """base_train's flag groups (as scripts/base_train.py's config, without its run-length flags):
    what an arm changes."""


def train_flags(overrides: dict[str, Any]) -> ArmFlags:
    """base_train's flags with the arm's changes (total_batch_size is base_train's own flag: the
    bench applies it itself, in accumulation())."""
    flags = ArmFlags(**{k: v for k, v in overrides.items() if k != "total_batch_size"})
    flags.validate()
    return flags


def model_config(cfg: RecipeConfig, overrides: dict[str, Any], vocab_size: int) -> GPTConfig:
    return GPTConfig(sequence_len=cfg.seq_len, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     n_kv_head=cfg.n_head, n_embd=cfg.n_embd, **train_flags(overrides).model_options())


def block_params(cfg: RecipeConfig) -> int:
    return cfg.n_layer * 12 * cfg.n_embd ** 2


def budgets(cfg: RecipeConfig) -> tuple[int, int]:
    """(screen, largest) in tokens, whole batches of batch_size x seq_len."""
    batch = cfg.batch_size * cfg.seq_len
    largest = max(2, round(cfg.tokens_per_param * block_params(cfg) / batch))
    return max(2, round(cfg.screen_fraction * largest)) * batch, largest * batch


def accumulation(cfg: RecipeConfig, overrides: dict[str, Any], vocab_size: int) -> int:
    """Micro-batches (of batch_size rows) per optimizer step: 1, or what --total_batch_size=-1 gives."""
    if overrides.get("total_batch_size") != -1:
        return 1
    reference = config_from_depth(AUTO_BATCH_REF_DEPTH, vocab_size, cfg.seq_len)  # as base_train builds it
    tokens = auto_total_batch_size(model_config(cfg, {}, vocab_size), reference, cfg.batch_size * cfg.seq_len)
    return tokens // (cfg.batch_size * cfg.seq_len)


def arm_flags(arm: str) -> dict[str, Any]:
    """An ARMS entry's flags; "a+b" (an --also_final combination) is a's and b's together."""
    return flags_combination(arm.split("+"))


def flags_combination(arms: list[str]) -> dict[str, Any]:
    combined: dict[str, Any] = {}
    for arm in arms:
        combined.update(ARMS[arm])
    return combined


# ---------------------------------------------------------------------------------------------
# one run

@dataclass(frozen=True)
class RunSpec:
    arm: str  # an ARMS name, or "combination"
    overrides: tuple[tuple[str, Any], ...]
    tokens: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.arm}|{json.dumps(dict(self.overrides), sort_keys=True)}|{self.tokens}|{self.seed}"


def train_run(spec: RunSpec, data: TokenData, cfg: RecipeConfig, ctx: RunContext) -> dict[str, Any]:
    """base_train's step on the bench's token stream with the arm's flags; bpb on both splits."""
    overrides = dict(spec.overrides)
    flags = train_flags(overrides)
    config = model_config(cfg, overrides, data.vocab_size)
    accum = accumulation(cfg, overrides, data.vocab_size)
    micro_batches = spec.tokens // (cfg.batch_size * cfg.seq_len)
    steps = max(1, micro_batches // accum)
    torch.manual_seed(spec.seed)
    model = GPT(config)
    optimizers = setup_optimizers(model, flags.unembedding_lr, flags.embedding_lr, flags.matrix_lr, flags.weight_decay,
                                  **flags.optimizer_options())
    stream = iter(data.batches(data.train[:steps * accum]))
    times, finite = [], True
    t_start = time.perf_counter()
    for step in range(steps):
        t0 = time.perf_counter()
        lrm = get_lr_multiplier(step, steps, flags.warmup_ratio, flags.warmdown_ratio, flags.final_lr_frac)
        loss, _ = train_step(model, optimizers, stream, accum, ctx, lrm, get_muon_momentum(step), flags.grad_clip)
        times.append(time.perf_counter() - t0)
        if not math.isfinite(loss):
            finite = False
            break

    def bpb(rows: torch.Tensor) -> float:
        batches = data.batches(rows)
        return evaluate_bpb(model, iter(batches), len(batches), data.token_bytes, ctx) if finite else math.inf

    step_s = statistics.median(times[1:] or times)
    return {"key": spec.key, "arm": spec.arm, "overrides": overrides, "tokens": steps * accum * cfg.batch_size * cfg.seq_len,
            "steps": steps, "micro_batches_per_step": accum, "seed": spec.seed,
            "selection_bpb": bpb(data.selection), "heldout_bpb": bpb(data.heldout),
            "tokens_per_s": accum * cfg.batch_size * cfg.seq_len / step_s, "seconds": time.perf_counter() - t_start}


# ---------------------------------------------------------------------------------------------
# the plan: screen every arm, pick the combination on the selection split, then the final runs

def spec(arm: str, overrides: dict[str, Any], tokens: int, seed: int) -> RunSpec:
    return RunSpec(arm, tuple(sorted(overrides.items())), tokens, seed)


def screen_specs(cfg: RecipeConfig) -> list[RunSpec]:
    screen, _ = budgets(cfg)
    return [spec(arm, ARMS[arm], screen, 0) for arm in cfg.arm_names()]


def chosen_pieces(runs: dict[str, dict[str, Any]], cfg: RecipeConfig) -> list[str] | None:
    """The arms whose screen beat the current recipe on the SELECTION split by > min_gain_pct (the
    best weight-decay arm only); None until every screen run is in."""
    screened = {s.arm: runs.get(s.key) for s in screen_specs(cfg)}
    if any(run is None for run in screened.values()):
        return None
    base = screened["current"]["selection_bpb"]

    def gain(arm: str) -> float:
        return 100 * (base - screened[arm]["selection_bpb"]) / base

    passing = [arm for arm in screened if arm != "current" and gain(arm) > cfg.min_gain_pct]
    decay = [arm for arm in passing if arm in WEIGHT_DECAY_ARMS]
    if decay:
        best = max(decay, key=gain)
        passing = [arm for arm in passing if arm not in WEIGHT_DECAY_ARMS or arm == best]
    return passing


def final_specs(cfg: RecipeConfig, pieces: list[str]) -> list[RunSpec]:
    """current and the combination at the largest budget, each seed; then the --also_final arms."""
    _, largest = budgets(cfg)
    arms = [("current", {})] + ([("combination", flags_combination(pieces))] if pieces else [])
    arms += [(arm, arm_flags(arm)) for arm in cfg.also_final_arms()]
    return [spec(arm, overrides, largest, seed) for arm, overrides in arms for seed in range(cfg.seeds)]


def needed_specs(runs: dict[str, dict[str, Any]], cfg: RecipeConfig) -> list[RunSpec]:
    specs = screen_specs(cfg)
    pieces = chosen_pieces(runs, cfg)
    return specs + (final_specs(cfg, pieces) if pieces is not None else [])


# ---------------------------------------------------------------------------------------------
# memory: measured at the bench size, planned at GPU sizes

def measure_speed(cfg: RecipeConfig, arms: dict[str, dict[str, Any]], data: TokenData) -> dict[str, dict[str, float]]:
    """Tokens/s of each arm's training step, alone in this process (the pool is gone by then) with
    --speed_threads threads: --speed_rounds rounds, every arm once per round (interleaved, so
    drift hits every arm alike), median step time; the load average before and after."""
    ctx = compute_init(device="cpu", dtype=cfg.dtype, threads=cfg.speed_threads)
    setups = {}
    for arm, overrides in arms.items():
        flags = train_flags(overrides)
        torch.manual_seed(0)
        model = GPT(model_config(cfg, overrides, data.vocab_size))
        optimizers = setup_optimizers(model, flags.unembedding_lr, flags.embedding_lr, flags.matrix_lr, flags.weight_decay,
                                      **flags.optimizer_options())
        setups[arm] = (model, optimizers, accumulation(cfg, overrides, data.vocab_size), flags.grad_clip)
    batches = data.batches(data.train[:64])
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    load_before = os.getloadavg()
    for round_ in range(cfg.speed_rounds + 1):  # round 0 warms up
        for arm, (model, optimizers, accum, clip) in setups.items():
            stream = iter(batches * (1 + accum * (cfg.speed_steps + 1) // len(batches)))
            for _ in range(cfg.speed_steps if round_ else 1):
                t0 = time.perf_counter()
                train_step(model, optimizers, stream, accum, ctx, grad_clip=clip)
                if round_:
                    times[arm].append((time.perf_counter() - t0) / accum)
    tokens = cfg.batch_size * cfg.seq_len
    return {arm: {"tokens_per_s": tokens / statistics.median(t), "threads": cfg.speed_threads,
                  "load_before": load_before[0], "load_after": os.getloadavg()[0]} for arm, t in times.items()}


def planned_memory(overrides: dict[str, Any]) -> dict[str, float]:
    """Planned peak GiB at d20 / d26, 8192 x 1 tokens, bf16, grad accumulation: dense and
    --memory_mode=lowest (k = 32, the default), with the arm's model pieces (optimizer pieces hold
    only per-row vectors, which the planner leaves out)."""
    flags = train_flags(overrides)
    out = {}
    for depth in PLAN_DEPTHS:
        for mode in ("dense", "lowest"):
            options = replace(flags, **MEMORY_SETTINGS[mode]).model_options()
            config = config_from_depth(depth, PLAN_VOCAB, PLAN_SEQ_LEN, **options)
            out[f"d{depth}_{mode}_gib"] = plan_memory(config, 1, "bfloat16", 2).peak / 2 ** 30
    return out


def memory_entry(cfg: RecipeConfig, overrides: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    entry: dict[str, Any] = planned_memory(overrides)
    if cfg.measure_memory:
        config = model_config(cfg, overrides, vocab_size)
        entry["bench_allocated_mb"] = measure_allocated_peak(config, cfg.batch_size, cfg.dtype, 1) / 1e6
    return entry


# ---------------------------------------------------------------------------------------------
# summary

def spread(values: list[float]) -> float:
    return max(values) - min(values) if values else 0.0


def summarize(runs: dict[str, dict[str, Any]], cfg: RecipeConfig, memory: dict[str, dict[str, Any]],
              speed: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Screen and final results; tokens/s from the quiet speed phase where it ran (else the
    quality runs' own step times, taken two runs at a time on one thread each)."""
    speed = speed or {}
    screen_tokens, largest = budgets(cfg)
    screened = {s.arm: runs.get(s.key) for s in screen_specs(cfg)}
    base = screened.get("current")
    screen = {}
    for arm, run in screened.items():
        if run is None:
            continue
        gain = 100 * (base["heldout_bpb"] - run["heldout_bpb"]) / base["heldout_bpb"] if base else None
        sel_gain = 100 * (base["selection_bpb"] - run["selection_bpb"]) / base["selection_bpb"] if base else None
        rate = speed.get(arm, {}).get("tokens_per_s") or run["tokens_per_s"]
        base_rate = (speed.get("current", {}).get("tokens_per_s") or base["tokens_per_s"]) if base else None
        screen[arm] = {"flags": ARMS[arm], "heldout_bpb": run["heldout_bpb"], "selection_bpb": run["selection_bpb"],
                       "gain_pct": gain, "selection_gain_pct": sel_gain, "tokens_per_s": rate,
                       "tokens_per_s_source": "speed phase" if arm in speed else "quality run",
                       "speed_vs_current": rate / base_rate if base_rate else None, "steps": run["steps"], "memory": memory.get(arm)}
    pieces = chosen_pieces(runs, cfg)
    final: dict[str, Any] = {}
    if pieces is not None:
        for s in final_specs(cfg, pieces):
            run = runs.get(s.key)
            if run is not None:
                final.setdefault(s.arm, {"flags": dict(s.overrides), "runs": []})["runs"].append(run)
        for arm, entry in final.items():
            bpbs = [r["heldout_bpb"] for r in entry["runs"]]
            entry.update(heldout_bpb=statistics.mean(bpbs), spread=spread(bpbs), seeds=len(bpbs),
                         tokens_per_s=speed.get(arm, {}).get("tokens_per_s") or statistics.median(r["tokens_per_s"] for r in entry["runs"]),
                         tokens_per_s_source="speed phase" if arm in speed else "quality runs",
                         tokens=entry["runs"][0]["tokens"], memory=memory.get(arm))
            entry.pop("runs")
        c = final.get("current")
        for arm, n in final.items():
            if c is not None and arm != "current":
                n["gain_pct"] = 100 * (c["heldout_bpb"] - n["heldout_bpb"]) / c["heldout_bpb"]
                n["speed_vs_current"] = n["tokens_per_s"] / c["tokens_per_s"]
    return {"screen_tokens": screen_tokens, "final_tokens": largest, "screen": screen, "pieces": pieces, "final": final}


def goals(summary: dict[str, Any], cfg: RecipeConfig) -> dict[str, bool | None]:
    final = summary["final"]
    c, n = final.get("current"), final.get("combination")
    done = c is not None and n is not None and c["seeds"] == n["seeds"] == cfg.seeds
    better = None
    if done:
        beyond = (c["heldout_bpb"] - n["heldout_bpb"]) > (c["spread"] + n["spread"]) / 2
        better = n["gain_pct"] >= 3.0 and beyond
    elif summary["pieces"] == []:
        better = False  # no piece passed the screen
    return {"combination >= 3% better val bpb than current (mean of seeds, beyond the spread)": better,
            "combination tokens/s >= 0.9x current": (n["speed_vs_current"] >= 0.9) if done else None}


def print_table(summary: dict[str, Any]) -> None:
    print0(f"screen: {summary['screen_tokens']:,} tokens, seed 0 (gain vs current; held-out, the selection split in brackets)")
    print0(f"{'arm':<15}{'bpb':>8}{'gain':>8}{'(sel)':>8}{'tok/s':>8}{'speed':>7}{'bench MB':>9}"
           f"{'d20 GiB':>9}{'d20 low':>8}{'d26 GiB':>9}{'d26 low':>8}")
    for arm, e in summary["screen"].items():
        m = e.get("memory") or {}
        print0(f"{arm:<15}{e['heldout_bpb']:>8.4f}{e['gain_pct']:>+7.2f}%{e['selection_gain_pct']:>+7.2f}%"
               f"{e['tokens_per_s']:>8.0f}{e['speed_vs_current']:>6.2f}x{m.get('bench_allocated_mb', float('nan')):>9.1f}"
               f"{m.get('d20_dense_gib', float('nan')):>9.2f}{m.get('d20_lowest_gib', float('nan')):>8.2f}"
               f"{m.get('d26_dense_gib', float('nan')):>9.2f}{m.get('d26_lowest_gib', float('nan')):>8.2f}")
    print0(f"combination: {summary['pieces']}")
    for arm, e in summary["final"].items():
        extra = f"  gain {e['gain_pct']:+.2f}%  speed {e['speed_vs_current']:.2f}x" if "gain_pct" in e else ""
        print0(f"final {arm:<12} {e['tokens']:,} tokens, {e['seeds']} seeds: held-out bpb {e['heldout_bpb']:.4f} "
               f"(spread {e['spread']:.4f}), {e['tokens_per_s']:.0f} tok/s{extra}")


def run(cfg: RecipeConfig, argv: list[str]) -> dict[str, Any]:
    out = Path(cfg.out)
    cache = out.with_suffix(".tokens.pt")
    runs = load_results(out, cfg, ignored=RESUMABLE)
    started, load_before = time.strftime("%Y-%m-%dT%H:%M:%S"), os.getloadavg()
    _, largest = budgets(cfg)
    steps = largest // (cfg.batch_size * cfg.seq_len)
    data = prepare_data(cfg, cache, steps)
    info = provenance(argv, "bench.recipe")
    saved = json.loads(out.read_text()) if out.exists() else {}
    memory: dict[str, dict[str, Any]] = dict(saved.get("memory", {}))
    speed: dict[str, dict[str, float]] = dict(saved.get("speed", {}))

    def save() -> dict[str, Any]:
        summary = summarize(runs, cfg, memory, speed)
        result = {**info, "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "load_average_at_start": load_before, "load_average_now": os.getloadavg(), "config": asdict(cfg),
                  "block_params": block_params(cfg), "vocab_size": data.vocab_size, "memory": memory, "speed": speed,
                  "runs": sorted(runs.values(), key=lambda r: r["key"]), "summary": summary, "goals": goals(summary, cfg)}
        write_json(out, result)
        return result

    print0(f"{len(runs)} runs found in {out}; screen {budgets(cfg)[0]:,} tokens, final {largest:,} tokens "
           f"({block_params(cfg):,} block parameters); {cfg.jobs} at a time")
    def finished(s: RunSpec, result: dict[str, Any]) -> None:
        print0(f"  {s.arm:<14} {result['tokens']:>10,} tokens seed {s.seed}: held-out bpb {result['heldout_bpb']:.4f} "
               f"(selection {result['selection_bpb']:.4f}), {result['tokens_per_s']:.0f} tok/s, {result['seconds']:.0f} s")
        save()

    with make_pool(cfg.jobs, init_worker, (RecipeConfig, asdict(cfg), str(cache), steps, train_run)) as pool:
        drive(pool, run_in_worker, lambda done: needed_specs(done, cfg), runs, info["git_revision"], finished)
    arms = {arm: arm_flags(arm) for arm in cfg.arm_names() + cfg.also_final_arms()}
    pieces = chosen_pieces(runs, cfg) or []
    if pieces:
        arms["combination"] = flags_combination(pieces)
    for arm, overrides in arms.items():
        if arm not in memory or memory[arm].get("flags") != overrides or (cfg.measure_memory and "bench_allocated_mb" not in memory[arm]):
            memory[arm] = {"flags": overrides, **memory_entry(cfg, overrides, data.vocab_size)}
    if cfg.speed_rounds:
        print0(f"tokens/s: {len(arms)} arms x {cfg.speed_rounds} rounds x {cfg.speed_steps} steps, {cfg.speed_threads} threads, "
               f"interleaved (load average {os.getloadavg()[0]:.2f})")
        speed.clear()
        speed.update(measure_speed(cfg, arms, data))
    result = save()
    print_table(result["summary"])
    print_goals(result["goals"])
    print0(f"wrote {out}")
    print0(json.dumps({"bench": "recipe", "out": str(out), "summary": result["summary"], "goals": result["goals"]}))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(RecipeConfig, argv, prog="python -m bench.recipe")
    return run_main(lambda cfg: run(cfg, argv), cfg)


if __name__ == "__main__":
    main()
