"""Step speed of the memory modes side by side: dense, recompute=block, MoleGrad default, keep_h,
lowest (eager and torch.compile'd), on one model, one process, arms interleaved.

    python -m bench.memory_modes                   # d8 (width 512), vocab 8192, seq 512: ~5 min on 2 CPU cores
    python -m bench.memory_modes --arms=dense,keep_h --rounds=3

Each arm builds the model as base_train does for that mode (MoleGrad rank --rank_k; keep_h and
lowest compress every block Linear with low-rank momentum) and runs optimizer steps on random
tokens. Steps are taken in rounds, one step of every arm per round, so that a change in machine
load hits every arm alike; the first --warmup rounds are discarded (compilation happens there) and
the median of the rest is reported, with tokens/s and its ratio to dense and to recompute=block.
Compile arms count the graphs dynamo compiled (one compilation = one graph, no recompiles).
Timing needs a quiet machine: check `cat /proc/loadavg` first. Table, goals, then one JSON line.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from nanochat.common import compute_init, run_main
from nanochat.config import Flags, check, parse_args
from nanochat.gpt import GPT, apply_memory_mode, config_from_depth
from nanochat.optim import setup_optimizers
from nanochat.trainer import train_step

# arm -> (GPTConfig memory options before the mode is applied, --memory_mode, compiled)
ARMS: dict[str, tuple[dict[str, Any], str, bool]] = {
    "dense": ({}, "custom", False),
    "recompute_block": ({"recompute": "block"}, "custom", False),
    "molegrad": ({"molegrad_targets": "ffn_only"}, "custom", False),
    "keep_h": ({}, "keep_h", False),
    "lowest": ({}, "lowest", False),
    "lowest_compiled": ({}, "lowest", True),
}


@dataclass
class MemoryModesConfig(Flags):
    """Tokens/s of dense, recompute=block, MoleGrad default, keep_h and lowest (eager, compiled)."""

    arms: str = field(default=",".join(ARMS), metadata={"help": f"comma-separated from {'|'.join(ARMS)}"})
    depth: int = field(default=8, metadata={"help": "model size (as base_train --depth; 8 -> width 512)"})
    vocab_size: int = field(default=8192, metadata={"help": "vocabulary (random tokens)"})
    max_seq_len: int = field(default=512, metadata={"help": "tokens per row"})
    device_batch_size: int = field(default=4, metadata={"help": "rows per step"})
    rank_k: int = field(default=32, metadata={"help": "MoleGrad rank k"})
    rounds: int = field(default=5, metadata={"help": "measured rounds (one step of every arm each)"})
    warmup: int = field(default=2, metadata={"help": "discarded rounds (compilation happens here)"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype", "choices": ("auto", "float32", "bfloat16")})
    threads: int = field(default=0, metadata={"help": "CPU threads (0 = all cores)"})

    def validate(self) -> None:
        super().validate()
        unknown = [a for a in self.arms.split(",") if a not in ARMS]
        check(not unknown, f"--arms: unknown arm(s) {unknown}, expected some of {'|'.join(ARMS)}")
        check(self.rounds >= 1 and self.warmup >= 0, f"--rounds: expected >= 1 (and --warmup >= 0), got {self.rounds}")


class Arm:
    """One mode's model, optimizers and batch stream."""

    def __init__(self, name: str, cfg: MemoryModesConfig, ctx) -> None:
        options, mode, compiled = ARMS[name]
        rank = 0 if name in ("dense", "recompute_block") else cfg.rank_k
        options = apply_memory_mode(mode, {"molegrad_rank_k": rank, **options})
        torch.manual_seed(0)
        self.name, self.compiled = name, compiled
        self.config = config_from_depth(cfg.depth, cfg.vocab_size, cfg.max_seq_len, **options)
        self.model = GPT(self.config).to(ctx.device)
        self.optimizers = setup_optimizers(self.model)
        self.forward = torch.compile(self.model) if compiled else self.model
        self.generator = torch.Generator().manual_seed(1)
        self.times: list[float] = []
        self.cfg, self.ctx = cfg, ctx

    def step(self) -> float:
        tokens = torch.randint(0, self.cfg.vocab_size, (self.cfg.device_batch_size, self.cfg.max_seq_len + 1), generator=self.generator)
        batch = (tokens[:, :-1].to(self.ctx.device), tokens[:, 1:].to(self.ctx.device))
        t0 = time.perf_counter()
        train_step(self.forward, self.optimizers, iter([batch]), 1, self.ctx, 1.0, 0.95, 1.0)
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
        "lowest >= 1.15x the tokens/s of recompute=block": ratio("lowest", "recompute_block"),
        "keep_h >= 1.10x the tokens/s of dense": ratio("keep_h", "dense"),
        "compiled lowest >= eager lowest": ratio("lowest_compiled", "lowest"),
    }
    needed = {"lowest >= 1.15x the tokens/s of recompute=block": 1.15, "keep_h >= 1.10x the tokens/s of dense": 1.10,
              "compiled lowest >= eager lowest": 1.0}
    goals = {goal: None if value is None else bool(value >= needed[goal]) for goal, value in checks.items()}
    if "lowest_compiled" in results:
        goals["compiled lowest: one compilation"] = results["lowest_compiled"]["graphs_compiled"] == 1
    width = arms[0].config.n_embd
    print(f"depth {cfg.depth} (width {width}), vocab {cfg.vocab_size}, {cfg.device_batch_size} x {cfg.max_seq_len} tokens/step, "
          f"MoleGrad k={cfg.rank_k}, {ctx.dtype}, {torch.get_num_threads()} threads, {cfg.rounds} rounds after {cfg.warmup}; "
          f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"{'arm':<17}{'step s':>8}{'tok/s':>9}{'vs dense':>10}{'vs block':>10}")
    for name, r in results.items():
        print(f"{name:<17}{r['step_s']:>8.3f}{r['tok_per_s']:>9.0f}{r.get('vs_dense', float('nan')):>10.2f}"
              f"{r.get('vs_recompute_block', float('nan')):>10.2f}" + (f"   graphs compiled: {r['graphs_compiled']}" if "graphs_compiled" in r else ""))
    for goal, passed in goals.items():
        value = checks.get(goal)
        print(f"  {'n/a ' if passed is None else 'PASS' if passed else 'FAIL'}  {goal}" + (f" ({value:.2f}x)" if value else ""))
    summary = {"bench": "memory_modes", "config": vars(cfg), "dtype": str(ctx.dtype), "threads": torch.get_num_threads(),
               "load_average_before": load_before, "load_average_after": os.getloadavg(), "results": results, "goals": goals}
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(MemoryModesConfig, argv, prog="python -m bench.memory_modes")
    return run_main(run, cfg)


if __name__ == "__main__":
    main()
