"""GPU check: planned vs measured peak memory, tokens/s and MFU of training steps, per memory mode.

    python -m bench.gpu_check          # on a CUDA machine: d12 at 8192 tokens x 1, then the deepest
                                       # depth the planner fits in lowest mode on this card; ~9 min (estimate)
    python -m bench.gpu_check --device=cpu --depth=1 --seq_len=64 --vocab_size=256 --steps=2 \\
        --compile_backend=aot_eager    # tiny, what tests/test_gpu_check.py runs

For each depth, each mode (--modes: memory settings of nanochat.model_flags.MEMORY_SETTINGS applied
to the memory flags, MoleGrad at --molegrad_rank_k; all = MODES: dense, recompute_block,
molegrad_ffn (MoleGrad's defaults: MLP Linears, dense momentum), low and lowest) that the planner
fits, eager and compiled: `steps` training steps (trainer.train_step, batch 1, no accumulation)
after `warmup`. Reported: the planned peak (memory.plan_memory), the measured peak beyond what was
allocated before the model was built (torch.cuda.max_memory_allocated; none on CPU, where
`python -m nanochat.memory --measure=True` measures one), median tokens/s, and MFU = tokens/s x
GPT.estimate_flops() (dense-equivalent FLOPs, so MoleGrad's smaller dW matmuls show as higher MFU)
/ common.peak_flops. Runs that would start after --time_budget_s are skipped and listed. A table, then one JSON line.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from nanochat.common import RunContext, compute_init, peak_flops, print0
from nanochat.config import check, parse_args
from nanochat.gpt import GPT, GPTConfig, config_from_depth
from nanochat.memory import GiB, format_size, gpu_bytes, parse_size, plan_memory
from nanochat.model_flags import MEMORY_SETTINGS, MemoryFlags
from nanochat.optim import setup_optimizers
from nanochat.trainer import train_step

MODES = ("dense", "recompute_block", "molegrad_ffn", "low", "lowest")  # --modes=all; any of MEMORY_SETTINGS runs
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}  # nanochat.memory's --dtype


@dataclass
class GpuCheckConfig(MemoryFlags):
    """Planned vs measured peak, tokens/s and MFU per memory mode, eager and compiled."""

    device: str = field(default="", metadata={"help": "cuda|cpu (empty = autodetect)"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype", "choices": ("auto", "float32", "bfloat16")})
    depth: int = field(default=12, metadata={"help": "the first depth checked"})
    seq_len: int = field(default=8192, metadata={"help": "tokens per sequence (batch 1)"})
    vocab_size: int = field(default=65536, metadata={"help": "vocabulary"})
    modes: str = field(default="all", metadata={"help": f"comma-separated memory settings, from {'|'.join(MEMORY_SETTINGS)}, "
                                                        f"or all ({','.join(MODES)})"})
    threads: int = field(default=0, metadata={"help": "CPU threads (0 = all cores)"})
    steps: int = field(default=3, metadata={"help": "timed training steps per run"})
    warmup: int = field(default=2, metadata={"help": "untimed steps first (compilation happens here)"})
    compile_backend: str = field(default="inductor", metadata={"help": "torch.compile backend for the compiled runs "
                                                                         "(empty = eager runs only)"})
    deepest: bool = field(default=True, metadata={"help": "also the deepest depth that fits the lowest mode"})
    gpu_memory: str = field(default="", metadata={"help": "budget for the deepest depth (empty = this card's "
                                                          "total memory; on CPU: no deepest depth)"})
    reserve: str = field(default="1GiB", metadata={"help": "CUDA context and fragmentation, kept free"})
    time_budget_s: float = field(default=420.0, metadata={"help": "no run starts after this many seconds"})
    seed: int = field(default=42, metadata={"help": "model init and token seed"})

    def validate(self) -> None:
        super().validate()
        for name in ("depth", "seq_len", "steps"):
            check(getattr(self, name) >= 1, f"--{name}: expected >= 1, got {getattr(self, name)}")
        check(self.vocab_size >= 2, f"--vocab_size: expected >= 2, got {self.vocab_size}")
        check(self.warmup >= 0, f"--warmup: expected >= 0, got {self.warmup}")
        unknown = [name for name in self.mode_names() if name not in MEMORY_SETTINGS]
        check(not unknown, f"--modes: unknown mode(s) {', '.join(unknown)}; expected some of {'|'.join(MEMORY_SETTINGS)} or all")
        for name, parse in (("gpu_memory", gpu_bytes), ("reserve", parse_size)):
            if getattr(self, name):
                try:
                    parse(getattr(self, name))
                except ValueError as e:
                    check(False, f"--{name}: {e}")
        for name in self.mode_names():
            replace(self, **MEMORY_SETTINGS[name]).memory_options()  # a flag against the mode's preset: ConfigError

    def mode_names(self) -> list[str]:
        return list(MODES) if self.modes == "all" else [name for name in self.modes.split(",") if name]


def mode_config(name: str, depth: int, cfg: GpuCheckConfig) -> GPTConfig:
    return config_from_depth(depth, cfg.vocab_size, cfg.seq_len, **replace(cfg, **MEMORY_SETTINGS[name]).memory_options())


def planned_peak(config: GPTConfig, ctx: RunContext) -> int:
    return plan_memory(config, 1, DTYPE_NAMES[ctx.dtype], grad_accum_steps=1, device_type=ctx.device_type).peak


def deepest_lowest_depth(cfg: GpuCheckConfig, ctx: RunContext) -> int:
    """The deepest depth whose planned lowest-mode peak + reserve fits the budget (0 = none)."""
    if cfg.gpu_memory:
        budget = gpu_bytes(cfg.gpu_memory)
    elif ctx.device_type == "cuda":
        budget = torch.cuda.get_device_properties(ctx.device).total_memory
    else:
        return 0
    reserve, deepest = parse_size(cfg.reserve), 0
    for depth in range(1, 129):
        if planned_peak(mode_config("lowest", depth, cfg), ctx) + reserve > budget:
            break
        deepest = depth
    return deepest


def run_mode(config: GPTConfig, backend: str, cfg: GpuCheckConfig, ctx: RunContext) -> dict[str, Any]:
    """warmup + steps training steps; the model's parameters, measured peak (CUDA), median tokens/s, MFU."""
    cuda = ctx.device_type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    torch.manual_seed(cfg.seed)
    with torch.device(ctx.device):
        model = GPT(config)
    params = sum(p.numel() for p in model.parameters())
    optimizers = setup_optimizers(model)
    runner = torch.compile(model, backend=backend) if backend else model
    generator = torch.Generator().manual_seed(cfg.seed)

    def batches():
        while True:
            tokens = torch.randint(0, config.vocab_size, (1, config.sequence_len + 1), generator=generator).to(ctx.device)
            yield tokens[:, :-1], tokens[:, 1:]

    stream, times = batches(), []
    try:
        for _ in range(cfg.warmup + cfg.steps):
            t0 = time.perf_counter()
            train_step(runner, optimizers, stream, 1, ctx)
            ctx.synchronize()
            times.append(time.perf_counter() - t0)
        measured = torch.cuda.max_memory_allocated() - baseline if cuda else None
        tok_per_s = config.sequence_len / statistics.median(times[cfg.warmup:])
        result = {"params": params, "measured_bytes": measured, "tok_per_s": tok_per_s,
                  "mfu": 100 * tok_per_s * model.estimate_flops() / peak_flops(ctx), "error": None}
    except torch.cuda.OutOfMemoryError:
        result = {"params": params, "measured_bytes": None, "tok_per_s": None, "mfu": None, "error": "out of memory"}
    del model, optimizers, runner, stream
    gc.collect()
    if backend:
        torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(GpuCheckConfig, argv, prog="python -m bench.gpu_check")
    ctx = compute_init(device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, threads=cfg.threads)
    t_start = time.perf_counter()
    deepest = deepest_lowest_depth(cfg, ctx) if cfg.deepest else 0
    plan = [(cfg.depth, name) for name in cfg.mode_names()]
    if deepest > cfg.depth and "lowest" in cfg.mode_names():
        plan.append((deepest, "lowest"))  # the other modes do not fit there
    budget = gpu_bytes(cfg.gpu_memory) if cfg.gpu_memory else (
        torch.cuda.get_device_properties(ctx.device).total_memory if ctx.device_type == "cuda" else None)
    device_name = torch.cuda.get_device_name(ctx.device) if ctx.device_type == "cuda" else "cpu"
    print0(f"gpu check on {device_name}, {DTYPE_NAMES[ctx.dtype]}, {cfg.seq_len} tokens x 1, vocab {cfg.vocab_size:,}, "
           f"MoleGrad k={cfg.molegrad_rank_k}; deepest lowest-mode depth for "
           f"{format_size(budget) if budget else 'no budget'}: {deepest or '-'}")
    print0(f"{'depth':>5} {'mode':<18}{'compile':>10}{'planned':>12}{'measured':>12}{'error':>8}{'tok/s':>10}{'MFU %':>7}")
    runs, skipped = [], []
    for depth, name in plan:
        config = mode_config(name, depth, cfg)
        planned = planned_peak(config, ctx)
        fits = budget is None or planned + parse_size(cfg.reserve) <= budget
        for backend in ("", cfg.compile_backend) if cfg.compile_backend else ("",):
            label = backend or "eager"
            if time.perf_counter() - t_start > cfg.time_budget_s:
                skipped.append(f"d{depth} {name} {label}: time budget")
                continue
            if not fits:
                skipped.append(f"d{depth} {name} {label}: planned {format_size(planned)} does not fit")
                continue
            result = run_mode(config, backend, cfg, ctx)
            row = {"depth": depth, "mode": name, "compile": label, "planned_bytes": planned, **result}
            measured = result["measured_bytes"]
            error = f"{100 * (planned / measured - 1):+.1f}%" if measured else "-"
            print0(f"{depth:>5} {name:<18}{label:>10}{format_size(planned):>12}"
                   f"{format_size(measured) if measured else '-':>12}{error:>8}"
                   f"{result['tok_per_s'] or 0:>10.0f}{result['mfu'] or 0:>7.1f}" + (f"  {result['error']}" if result["error"] else ""))
            runs.append(row)
    for line in skipped:
        print0(f"skipped: {line}")
    summary = {"bench": "gpu_check", "device": device_name, "config": asdict(cfg), "deepest_lowest_depth": deepest,
               "budget_gib": budget / GiB if budget else None, "seconds": time.perf_counter() - t_start,
               "runs": runs, "skipped": skipped}
    print0(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
