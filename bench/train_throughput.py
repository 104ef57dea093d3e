"""Training throughput and MFU on this machine, with the matmul peak measured in the same run.

    python -m bench.train_throughput                       # d6, seq 512, batch 32, 16384 tokens/step
    python -m bench.train_throughput --arms=auto,fp32      # several settings side by side

Each arm builds the same model the way base_train does (with the memory flags: --recompute,
--molegrad, --memory_mode, ...) and runs optimizer steps on random tokens (the data pipeline is
benchmarked separately by the dataloader); the first --warmup steps are discarded and the median of
the rest is reported. MFU = model FLOPs/token (GPT.estimate_flops: 6N + causal attention) x
tokens/s / the bf16 dense peak: on CUDA common.peak_flops (a listed GPU's datasheet figure, else a
measured matmul); on CPU a matmul on all cores measured here, before and after the arms. Table, then one JSON line.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field

import torch

from nanochat.common import compute_init, matmul_flops, peak_flops, set_cpu_threads
from nanochat.config import parse_args
from nanochat.gpt import GPT, config_from_depth
from nanochat.model_flags import MemoryFlags
from nanochat.optim import setup_optimizers
from nanochat.trainer import grad_accum_steps, train_step

# arm name -> (dtype, threads); "auto" is what base_train picks by default
ARMS = {"auto": ("auto", 0), "fp32": ("float32", 0), "bf16": ("bfloat16", 0), "bf16_1thread": ("bfloat16", 1)}


@dataclass
class BenchConfig(MemoryFlags):
    """Training throughput and MFU, with the matmul peak measured in the same run."""

    depth: int = 6
    max_seq_len: int = 512
    device_batch_size: int = 32
    total_batch_size: int = 16384
    vocab_size: int = field(default=65536, metadata={"help": "vocabulary (65536 = the default tokenizer)"})
    steps: int = field(default=4, metadata={"help": "measured optimizer steps per arm"})
    warmup: int = field(default=1, metadata={"help": "discarded steps per arm"})
    arms: str = field(default="auto", metadata={"help": f"comma-separated, from {'|'.join(ARMS)}"})


def run_arm(cfg: BenchConfig, name: str) -> dict:
    dtype_name, threads = ARMS[name]
    ctx = compute_init(dtype=dtype_name, seed=0, threads=threads)
    model_config = config_from_depth(cfg.depth, cfg.vocab_size, cfg.max_seq_len, **cfg.memory_options())
    model = GPT(model_config).to(ctx.device)
    model.init_weights()
    optimizers = setup_optimizers(model, 0.004, 0.2, 0.02, 0.0)
    grad_accum = grad_accum_steps(cfg.total_batch_size, cfg.device_batch_size, cfg.max_seq_len, 1)
    gen = torch.Generator().manual_seed(0)

    def batches():
        while True:
            tokens = torch.randint(0, cfg.vocab_size, (cfg.device_batch_size, cfg.max_seq_len + 1), generator=gen)
            yield tokens[:, :-1].to(ctx.device), tokens[:, 1:].to(ctx.device)

    stream = batches()
    times = []
    for i in range(cfg.warmup + cfg.steps):
        t0 = time.perf_counter()
        train_step(model, optimizers, stream, grad_accum, ctx)
        ctx.synchronize()
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tok_per_s = cfg.total_batch_size / step_s
    flops_per_token = model.estimate_flops()
    return {
        "arm": name,
        "dtype": str(ctx.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "step_s": step_s,
        "tok_per_s": tok_per_s,
        "model_flops_per_s": tok_per_s * flops_per_token,
    }


def measure_peak() -> float:
    """The bf16 dense peak FLOP/s: common.peak_flops on CUDA; on CPU a 2048² matmul on all cores
    for 2 s (steadier than peak_flops' short one, and measured afresh at each call)."""
    if torch.cuda.is_available():
        return peak_flops(compute_init(device="cuda", dtype="bfloat16", seed=0))
    set_cpu_threads(0)
    return matmul_flops("cpu", torch.bfloat16, seconds=2.0, size=2048)


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_args(BenchConfig, argv, prog="python -m bench.train_throughput")
    for name in cfg.arms.split(","):
        if name not in ARMS:
            raise SystemExit(f"error: --arms: unknown arm {name!r}, expected some of {'|'.join(ARMS)}")
    # the denominator, measured before and after the arms: the larger of the two is used, so a
    # machine that got busier mid-run cannot inflate the MFU; never below the best arm's model-FLOP
    # rate, so no MFU above 100% is printed (the table's header then says so)
    peaks = [measure_peak()]
    results = []
    for name in cfg.arms.split(","):
        results.append(run_arm(cfg, name))
        set_cpu_threads(0)
    peaks.append(measure_peak())
    best = max(r["model_flops_per_s"] for r in results)
    peak = max(peaks + [best])
    for r in results:
        r["mfu"] = r["model_flops_per_s"] / peak
    print(f"depth {cfg.depth}, seq {cfg.max_seq_len}, batch {cfg.device_batch_size}, {cfg.total_batch_size} tokens/step, "
          f"vocab {cfg.vocab_size}; bf16 peak {peak / 1e9:.0f} GFLOP/s (before {peaks[0] / 1e9:.0f}, after {peaks[1] / 1e9:.0f}"
          + ("; raised to the best arm's rate" if best > max(peaks) else "") + ")")
    print(f"{'arm':<14}{'dtype':<10}{'thr':>4}{'step s':>9}{'tok/s':>9}{'GFLOP/s':>9}{'MFU':>7}")
    for r in results:
        print(f"{r['arm']:<14}{r['dtype']:<10}{r['threads']:>4}{r['step_s']:>9.2f}{r['tok_per_s']:>9.0f}"
              f"{r['model_flops_per_s'] / 1e9:>9.0f}{100 * r['mfu']:>6.1f}%")
    print(json.dumps({"bench": "train_throughput", "config": vars(cfg), "bf16_peak_flops": peak, "peaks": peaks, "results": results}))
    return results


if __name__ == "__main__":
    main()
