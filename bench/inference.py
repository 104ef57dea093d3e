"""Decode speed: the Engine's KV cache vs a full recompute per token (GPT.generate), batch 1 vs 8.

    python -m bench.inference                                   # d4, vocab 65536, 256 new tokens
    python -m bench.inference --dtypes=float32,bfloat16 --threads=1,2

Same randomly initialised model for every arm, one process. Each arm samples `--new_tokens`
tokens (temperature 1, so every arm does the same sampling work) after a `--prompt_tokens` prompt;
the time includes the prompt's prefill. Arms per (dtype, threads):
- full: GPT.generate, one forward over the whole sequence per new token (batch 1);
- kv bN: Engine.generate with N samples from the one prompt (prefill once, then one token per
  row per step through the cache).
tok/s counts generated tokens over all samples. A 16-token warmup run per arm, then the median
of --repeats runs (--full_repeats for the slow full-recompute arm). Table, then one JSON line.

Measured with `python -m bench.inference --threads=1,2` on a 2-vCPU machine shared with other
jobs (load ~5): at 1 thread, full 3.9 tok/s, kv b1 37.7 (9.6x), kv b8 151.8 (4.0x kv b1); at 2
threads the contended OpenMP threads slowed every arm 2-7x (full 1.9, kv b1 9.6, kv b8 20.9).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from nanochat.common import autodetect_device_type, resolve_dtype, set_cpu_threads
from nanochat.config import check, parse_args
from nanochat.engine import Engine
from nanochat.gpt import GPT, config_from_depth

WARMUP_TOKENS = 16


@dataclass
class BenchConfig:
    depth: int = field(default=4, metadata={"help": "model size (as base_train --depth)"})
    vocab_size: int = field(default=65536, metadata={"help": "vocabulary (65536 = the default tokenizer)"})
    prompt_tokens: int = field(default=16, metadata={"help": "prompt length"})
    new_tokens: int = field(default=256, metadata={"help": "tokens generated per sample"})
    batch_sizes: str = field(default="1,8", metadata={"help": "comma-separated samples per KV-cache call"})
    dtypes: str = field(default="float32", metadata={"help": "comma-separated, from float32|bfloat16"})
    threads: str = field(default="2", metadata={"help": "comma-separated CPU thread counts (docs/cpu_notes.md: 2 decodes fastest)"})
    repeats: int = field(default=3, metadata={"help": "measured runs per KV-cache arm"})
    full_repeats: int = field(default=1, metadata={"help": "measured runs of the full-recompute arm (0 = skip it)"})
    device: str = field(default="", metadata={"help": "cuda|mps|cpu (empty = autodetect)"})

    def validate(self) -> None:
        check(self.prompt_tokens >= 1, f"--prompt_tokens: expected >= 1, got {self.prompt_tokens}")
        check(self.new_tokens >= 1, f"--new_tokens: expected >= 1, got {self.new_tokens}")
        check(self.repeats >= 1, f"--repeats: expected >= 1, got {self.repeats}")
        check(self.full_repeats >= 0, f"--full_repeats: expected >= 0, got {self.full_repeats}")


def timed(run: Callable[[int], None], new_tokens: int, repeats: int, synchronize: Callable[[], None]) -> float:
    """Median seconds of `repeats` runs of `new_tokens` tokens, after a short warmup run."""
    run(min(WARMUP_TOKENS, new_tokens))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(new_tokens)
        synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(BenchConfig, argv, prog="python -m bench.inference")
    device_type = autodetect_device_type(cfg.device)
    device = torch.device(device_type)
    batch_sizes = [int(b) for b in cfg.batch_sizes.split(",")]
    dtype_names = cfg.dtypes.split(",")
    thread_counts = [int(t) for t in cfg.threads.split(",")] if device_type == "cpu" else [0]
    synchronize = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)

    torch.manual_seed(0)
    model_config = config_from_depth(cfg.depth, cfg.vocab_size, sequence_len=cfg.prompt_tokens + cfg.new_tokens)
    model = GPT(model_config).to(device).eval()
    prompt = torch.randint(0, cfg.vocab_size, (cfg.prompt_tokens,)).tolist()
    print(f"model: depth {cfg.depth}, width {model_config.n_embd}, vocab {cfg.vocab_size:,}, {model.num_params():,} params; "
          f"prompt {cfg.prompt_tokens} + {cfg.new_tokens} new tokens on {device_type}")

    rows = []
    for dtype_name in dtype_names:
        model.to(resolve_dtype(device_type, dtype_name))  # weights in the dtype, as chat_cli/chat_web load them
        engine = Engine(model, None)
        for threads in thread_counts:
            if device_type == "cpu":
                set_cpu_threads(threads)
            arms: list[tuple[str, int, int, Callable[[int], None]]] = []
            if cfg.full_repeats > 0:
                def full(new_tokens: int) -> None:
                    model.generate(prompt, new_tokens, temperature=1.0)
                arms.append(("full", 1, cfg.full_repeats, full))
            for batch in batch_sizes:
                def kv(new_tokens: int, batch: int = batch) -> None:
                    for _ in engine.generate(prompt, num_samples=batch, max_tokens=new_tokens, temperature=1.0):
                        pass
                arms.append((f"kv b{batch}", batch, cfg.repeats, kv))
            for name, batch, repeats, run in arms:
                seconds = timed(run, cfg.new_tokens, repeats, synchronize)
                rows.append({"arm": name, "dtype": dtype_name, "threads": threads, "batch": batch, "seconds": seconds,
                             "tok_per_s": batch * cfg.new_tokens / seconds})
                print(f"  measured {name:<8} {dtype_name:<9} threads={threads}: {seconds:.2f} s", flush=True)

    def tok_per_s(arm: str, dtype_name: str, threads: int) -> float:
        return next((r["tok_per_s"] for r in rows if (r["arm"], r["dtype"], r["threads"]) == (arm, dtype_name, threads)), float("nan"))

    print()
    print(f"{'arm':<9} {'dtype':<9} {'threads':>7} {'batch':>5} {'seconds':>8} {'tok/s':>9} {'vs full':>8} {'vs kv b1':>8}")
    for r in rows:
        full = tok_per_s("full", r["dtype"], r["threads"])
        kv1 = tok_per_s("kv b1", r["dtype"], r["threads"])
        r["speedup_vs_full"] = r["tok_per_s"] / full
        r["speedup_vs_kv_b1"] = r["tok_per_s"] / kv1
        print(f"{r['arm']:<9} {r['dtype']:<9} {r['threads']:>7} {r['batch']:>5} {r['seconds']:>8.2f} {r['tok_per_s']:>9.1f} "
              f"{r['speedup_vs_full']:>7.1f}x {r['speedup_vs_kv_b1']:>7.1f}x")
    result = {"bench": "inference", "depth": cfg.depth, "vocab_size": cfg.vocab_size, "prompt_tokens": cfg.prompt_tokens,
              "new_tokens": cfg.new_tokens, "device": device_type, "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
