"""Step speed of the memory modes side by side, on one model, one process, arms interleaved: by
default every mode a user is told to pick (DEFAULT_ARMS: dense, recompute_block, the MoleGrad presets
low, lowest, keep_h, the practitioner stack standard and low_bf16); any other memory setting, and
lowest torch.compile'd, on request.

    python -m bench.memory_modes                   # d8 (width 512), vocab 8192, seq 512: 7 rounds, ~80 s each on 1 core
    python -m bench.memory_modes --arms=dense,bf16_weights,int8_states,recompute_block,standard --threads=1
    python -m bench.memory_modes --arms=lowest,lowest_compiled

Each arm builds the model and optimizers as base_train does for its memory setting
(nanochat.model_flags.MEMORY_SETTINGS, applied to this bench's memory flags: MoleGrad at
--molegrad_rank_k, the precision options of the setting) and runs optimizer steps on random tokens.
Steps are taken in rounds, one step of every arm per round, so that a change in machine load hits
every arm alike; the first --warmup rounds are discarded (compilation happens there) and the median
of the rest is reported, with tokens/s and its ratio to dense and to recompute_block. An arm with
precision options (bf16 weights, 8-bit states) is also compared with its fp32 twin, the arm with the
same model options and fp32 precision (standard -> recompute_block, low_bf16 -> low), where it ran:
issue 25's goal is >= 0.9x. Compile arms count the graphs dynamo compiled (one compilation = one
graph, no recompiles).
Timing needs a quiet machine: check `cat /proc/loadavg` first. Table, goals, then one JSON line.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from nanochat.common import compute_init, run_main
from nanochat.config import check, parse_args
from nanochat.gpt import GPT, config_from_depth
from nanochat.model_flags import MEMORY_SETTINGS, MemoryFlags
from nanochat.optim import setup_optimizers
from nanochat.trainer import train_step

# arm -> (memory setting, compiled)
ARMS: dict[str, tuple[str, bool]] = {**{name: (name, False) for name in MEMORY_SETTINGS}, "lowest_compiled": ("lowest", True)}
DEFAULT_ARMS = ("dense", "recompute_block", "low", "lowest", "keep_h", "standard", "low_bf16")
PRECISION_GOAL = 0.9  # an arm with precision options: at least this share of its fp32 twin's tokens/s


@dataclass
class MemoryModesConfig(MemoryFlags):
    """Tokens/s of the memory modes a user picks from (eager; lowest also compiled), side by side."""

    arms: str = field(default=",".join(DEFAULT_ARMS), metadata={"help": f"comma-separated from {'|'.join(ARMS)}"})
    depth: int = field(default=8, metadata={"help": "model size (as base_train --depth; 8 -> width 512)"})
    vocab_size: int = field(default=8192, metadata={"help": "vocabulary (random tokens)"})
    max_seq_len: int = field(default=512, metadata={"help": "tokens per row"})
    device_batch_size: int = field(default=4, metadata={"help": "rows per step"})
    rounds: int = field(default=5, metadata={"help": "measured rounds (one step of every arm each)"})
    warmup: int = field(default=2, metadata={"help": "discarded rounds (compilation happens here)"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype", "choices": ("auto", "float32", "bfloat16")})
    threads: int = field(default=0, metadata={"help": "CPU threads (0 = all cores)"})

    def validate(self) -> None:
        super().validate()
        unknown = [a for a in self.arms.split(",") if a not in ARMS]
        check(not unknown, f"--arms: unknown arm(s) {unknown}, expected some of {'|'.join(ARMS)}")
        check(self.rounds >= 1 and self.warmup >= 0, f"--rounds: expected >= 1 (and --warmup >= 0), got {self.rounds}")
        for name in self.arms.split(","):
            arm_flags(name, self).memory_options()  # a flag against the arm's preset: ConfigError


def arm_flags(name: str, cfg: MemoryModesConfig) -> MemoryFlags:
    """The bench's memory flags with the arm's memory setting applied."""
    return replace(cfg, **MEMORY_SETTINGS[ARMS[name][0]])


class Arm:
    """One mode's model, optimizers and batch stream."""

    def __init__(self, name: str, cfg: MemoryModesConfig, ctx) -> None:
        torch.manual_seed(0)
        self.name, self.compiled = name, ARMS[name][1]
        self.config = config_from_depth(cfg.depth, cfg.vocab_size, cfg.max_seq_len, **arm_flags(name, cfg).memory_options())
        self.precision = arm_flags(name, cfg).precision_options()
        self.model = GPT(self.config).to(ctx.device)
        self.optimizers = setup_optimizers(self.model, **self.precision, seed=0)
        self.forward = torch.compile(self.model) if self.compiled else self.model
        self.generator = torch.Generator().manual_seed(1)
        self.times: list[float] = []
        self.cfg, self.ctx = cfg, ctx

    def step(self) -> float:
        tokens = torch.randint(0, self.cfg.vocab_size, (self.cfg.device_batch_size, self.cfg.max_seq_len + 1), generator=self.generator)
        batch = (tokens[:, :-1].to(self.ctx.device), tokens[:, 1:].to(self.ctx.device))
        t0 = time.perf_counter()
        train_step(self.forward, self.optimizers, iter([batch]), 1, self.ctx)
        self.ctx.synchronize()
        return time.perf_counter() - t0


def run(cfg: MemoryModesConfig) -> dict[str, Any]:
    ctx = compute_init(device="cpu" if not torch.cuda.is_available() else "", dtype=cfg.dtype, threads=cfg.threads)
    load_before = os.getloadavg()
    torch._dynamo.reset()
    arms = [Arm(name, cfg, ctx) for name in cfg.arms.split(",")]
    compiles: dict[str, int] = {}
    for round_index in range(cfg.warmup + cfg.rounds):
        for arm in arms:
            before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            seconds = arm.step()
            if arm.compiled:
                compiles[arm.name] = compiles.get(arm.name, 0) + torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
            if round_index >= cfg.warmup:
                arm.times.append(seconds)
    tokens = cfg.device_batch_size * cfg.max_seq_len
    results = {arm.name: {"step_s": statistics.median(arm.times), "tok_per_s": tokens / statistics.median(arm.times),
                          "times": arm.times, **({"graphs_compiled": compiles.get(arm.name, 0)} if arm.compiled else {})}
               for arm in arms}
    for r in results.values():
        for ref in ("dense", "recompute_block"):
            if ref in results:
                r[f"vs_{ref}"] = r["tok_per_s"] / results[ref]["tok_per_s"]

    def ratio(a: str, b: str) -> float | None:
        return results[a]["tok_per_s"] / results[b]["tok_per_s"] if a in results and b in results else None

    checks = {
        "lowest >= 1.15x the tokens/s of recompute_block": ratio("lowest", "recompute_block"),
        "keep_h >= 1.10x the tokens/s of dense": ratio("keep_h", "dense"),
        "compiled lowest >= eager lowest": ratio("lowest_compiled", "lowest"),
    }
    needed = {"lowest >= 1.15x the tokens/s of recompute_block": 1.15, "keep_h >= 1.10x the tokens/s of dense": 1.10,
              "compiled lowest >= eager lowest": 1.0}
    for arm, twin in fp32_twins(arms).items():
        goal = f"{arm.name} >= {PRECISION_GOAL}x the tokens/s of {twin.name} (its fp32 twin)"
        results[arm.name]["vs_fp32_twin"] = checks[goal] = ratio(arm.name, twin.name)
        needed[goal] = PRECISION_GOAL
    goals = {goal: None if value is None else bool(value >= needed[goal]) for goal, value in checks.items()}
    if "lowest_compiled" in results:
        goals["compiled lowest: one compilation"] = results["lowest_compiled"]["graphs_compiled"] == 1
    width = arms[0].config.n_embd
    print(f"depth {cfg.depth} (width {width}), vocab {cfg.vocab_size}, {cfg.device_batch_size} x {cfg.max_seq_len} tokens/step, "
          f"MoleGrad k={cfg.molegrad_rank_k}, {ctx.dtype}, {torch.get_num_threads()} threads, {cfg.rounds} rounds after {cfg.warmup}; "
          f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"{'arm':<17}{'step s':>8}{'tok/s':>9}{'vs dense':>10}{'vs block':>10}{'vs fp32':>9}")
    for name, r in results.items():
        print(f"{name:<17}{r['step_s']:>8.3f}{r['tok_per_s']:>9.0f}{r.get('vs_dense', float('nan')):>10.2f}"
              f"{r.get('vs_recompute_block', float('nan')):>10.2f}{r.get('vs_fp32_twin', float('nan')):>9.2f}" + (f"   graphs compiled: {r['graphs_compiled']}" if "graphs_compiled" in r else ""))
    for goal, passed in goals.items():
        value = checks.get(goal)
        print(f"  {'n/a ' if passed is None else 'PASS' if passed else 'FAIL'}  {goal}" + (f" ({value:.2f}x)" if value else ""))
    summary = {"bench": "memory_modes", "config": vars(cfg), "dtype": str(ctx.dtype), "threads": torch.get_num_threads(),
               "load_average_before": load_before, "load_average_after": os.getloadavg(), "results": results, "goals": goals}
    print(json.dumps(summary))
    return summary


def fp32_twins(arms: list[Arm]) -> dict[Arm, Arm]:
    """Each eager arm with precision options -> the eager arm among `arms` with the same model and
    fp32 precision (the options' defaults), where there is one."""
    fp32 = MemoryFlags().precision_options()
    twins = {}
    for arm in arms:
        if arm.precision != fp32 and not arm.compiled:
            twin = next((t for t in arms if t.precision == fp32 and not t.compiled and t.config == arm.config), None)
            if twin is not None:
                twins[arm] = twin
    return twins


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(MemoryModesConfig, argv, prog="python -m bench.memory_modes")
    return run_main(run, cfg)


if __name__ == "__main__":
    main()
