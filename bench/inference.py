"""Decode speed: the Engine's KV cache vs a full recompute per token (GPT.generate), batch 1 vs 8;
and, with --baseline_rev, this tree against an earlier git revision.

    python -m bench.inference                                   # d4, vocab 65536, 256 new tokens
    python -m bench.inference --dtypes=float32,bfloat16 --threads=1,2
    python -m bench.inference --baseline_rev=9983111 --threads=1 --new_tokens=128   # before vs after, ~6 min

Same randomly initialised model for every arm, one process. Each arm samples `--new_tokens`
tokens (temperature 1, so every arm does the same sampling work) after a `--prompt_tokens` prompt;
the time includes the prompt's prefill. Arms per (dtype, threads):
- full: GPT.generate, one forward over the whole sequence per new token (batch 1);
- kv bN: Engine.generate with N samples from the one prompt (prefill once, then one token per
  row per step through the cache).
tok/s counts generated tokens over all samples. A 16-token warmup run per arm, then the median
of --repeats runs (--full_repeats for the slow full-recompute arm). Table, then one JSON line.

--baseline_rev=REV: `git archive REV` is unpacked into a temporary directory and the same
measurement (`measure_tree`) runs on it and on this working tree, each in a fresh subprocess
with that tree first on PYTHONPATH, alternating (before, after, after, before, ...) for --repeats
rounds; medians. Per tree, after a short warmup: kv b1 and kv b8 (as above), kv 8 prompts (8
different prompts, 1 sample each: Engine.generate_many where the tree has it, else one prompt
after another, as chat_eval did), and chat_eval's generative scoring (evaluation.run_generative,
greedy, 1 sample) of --eval_problems Arithmetic test problems with a tokenizer trained on the
task's text and the same model (logits of ids outside the tokenizer's vocabulary pinned to 0).
The replies of both trees are hashed: equal hashes mean both did the same work.

Measured with `python -m bench.inference --threads=1,2` on a 2-vCPU machine shared with other
jobs (load ~5): at 1 thread, full 3.9 tok/s, kv b1 37.7 (9.6x), kv b8 151.8 (4.0x kv b1); at 2
threads the contended OpenMP threads slowed every arm 2-7x (full 1.9, kv b1 9.6, kv b8 20.9).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from nanochat.common import autodetect_device_type, resolve_dtype, set_cpu_threads
from nanochat.config import check, parse_args
from nanochat.engine import Engine
from nanochat.gpt import GPT, config_from_depth

WARMUP_TOKENS = 16
REPO = Path(__file__).resolve().parent.parent
# runs measure_tree on the tree first on PYTHONPATH: argv = bench directory, spec as JSON
ARM_COMMAND = ("import json, sys; sys.path.insert(0, sys.argv[1]); import inference; "
               "print(json.dumps(inference.measure_tree(json.loads(sys.argv[2]))))")
TREE_METRICS = ("kv b1", "kv b8", "kv 8 prompts", "chat_eval")


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
    baseline_rev: str = field(default="", metadata={
        "help": "git revision to compare with (e.g. 9983111): its export and this tree measured alternately, "
                "--repeats rounds, on the CPU, one thread count, float32 (empty = the in-process arms)"})
    eval_problems: int = field(default=16, metadata={"help": "chat_eval problems per run with --baseline_rev"})

    def validate(self) -> None:
        check(self.prompt_tokens >= 1, f"--prompt_tokens: expected >= 1, got {self.prompt_tokens}")
        check(self.eval_problems >= 1, f"--eval_problems: expected >= 1, got {self.eval_problems}")
        if self.baseline_rev:
            check("," not in self.threads, f"--threads: --baseline_rev measures one thread count, got {self.threads}")
            check(self.dtypes == "float32" and self.device in ("", "cpu"),
                  f"--baseline_rev: measures float32 on the CPU, got --dtypes={self.dtypes} --device={self.device}")
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
    if cfg.baseline_rev:
        return compare_with_baseline(cfg)
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


# ---------------------------------------------------------------------------------------------
# before vs after: this tree against a git revision

def bench_model(depth: int, vocab_size: int, sequence_len: int, live_vocab: int) -> GPT:
    """The bench's random model; logits of ids >= live_vocab (outside a tokenizer's vocabulary) are
    0 while the others spread around it (lm_head rows ~ N(0, 0.1)), so greedy decoding picks ids the
    tokenizer knows."""
    torch.manual_seed(0)
    model = GPT(config_from_depth(depth, vocab_size, sequence_len=sequence_len)).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.1)[live_vocab:] = 0.0
    return model


class _RecordingTask:
    """A task's problems with its scoring, recording every reply (for a hash of the work done)."""

    def __init__(self, task: Any) -> None:
        self.task, self.replies = task, []

    def __len__(self) -> int:
        return len(self.task)

    def __getitem__(self, index: int) -> Any:
        return self.task[index]

    def evaluate(self, conversation: Any, reply: str) -> bool:
        self.replies.append((conversation["messages"][0]["content"], reply))
        return self.task.evaluate(conversation, reply)


def measure_tree(spec: dict[str, Any]) -> dict[str, Any]:
    """Seconds per TREE_METRICS run on the nanochat first on sys.path (see the module docstring),
    after a warmup of each; only APIs the baseline has too, plus Engine.generate_many where present."""
    import nanochat
    from nanochat.evaluation import run_generative
    from nanochat.tokenizer import Tokenizer
    from tasks.arithmetic import Arithmetic

    set_cpu_threads(spec["threads"])
    corpus = Arithmetic(size=400, split="train")
    texts = [str(corpus[i]["messages"]) for i in range(len(corpus))]
    tokenizer = Tokenizer.train_from_iterator(texts, vocab_size=1024)
    model = bench_model(spec["depth"], spec["vocab_size"], spec["prompt_tokens"] + spec["new_tokens"] + 512,
                        tokenizer.get_vocab_size())
    plain, chat = Engine(model, None), Engine(model, tokenizer)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, spec["vocab_size"], (spec["prompt_tokens"] + i,), generator=generator).tolist()
               for i in range(8)]  # 8 lengths
    problems = Arithmetic(size=spec["eval_problems"], split="test")
    replies: list[tuple[str, str]] = []

    def kv(batch: int) -> Callable[[int], None]:
        def run(new_tokens: int) -> None:
            for _ in plain.generate(prompts[0], num_samples=batch, max_tokens=new_tokens, temperature=1.0):
                pass
        return run

    def many(new_tokens: int) -> None:
        if hasattr(plain, "generate_many"):
            for _ in plain.generate_many(prompts, 1, new_tokens, 1.0, seeds=list(range(8)), batch_size=8):
                pass
        else:
            for i, prompt in enumerate(prompts):
                plain.generate_batch(prompt, 1, new_tokens, 1.0, seed=i)

    def chat_eval(new_tokens: int) -> None:
        task = _RecordingTask(problems)
        run_generative(chat, tokenizer, task, len(problems), 1, new_tokens, 0.0, 50, torch.device("cpu"))
        replies[:] = task.replies

    seconds = {}
    for name, run in zip(TREE_METRICS, (kv(1), kv(8), many, chat_eval)):
        run(min(WARMUP_TOKENS, spec["new_tokens"]))
        t0 = time.perf_counter()
        run(spec["new_tokens"])
        seconds[name] = time.perf_counter() - t0
    digest = hashlib.sha256(json.dumps(sorted(replies)).encode()).hexdigest()[:16]
    return {"nanochat": str(Path(nanochat.__file__).parent), "seconds": seconds, "replies_sha256": digest}


def export_revision(rev: str, into: Path) -> None:
    """`git archive rev` of this repository, unpacked into `into`."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev], capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"error: --baseline_rev={rev}: git archive failed: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")


def run_tree(tree: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """measure_tree in a fresh interpreter that imports nanochat (and tasks) from `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(spec["threads"])}
    done = subprocess.run([sys.executable, "-c", ARM_COMMAND, str(Path(__file__).resolve().parent), json.dumps(spec)],
                          cwd=tree, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: measuring {tree} failed:\n{done.stderr.strip()}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(result["nanochat"]).resolve() != (tree / "nanochat").resolve():
        raise SystemExit(f"error: measuring {tree} imported nanochat from {result['nanochat']}")
    return result


def compare_with_baseline(cfg: BenchConfig) -> dict[str, Any]:
    spec = {"depth": cfg.depth, "vocab_size": cfg.vocab_size, "prompt_tokens": cfg.prompt_tokens,
            "new_tokens": cfg.new_tokens, "eval_problems": cfg.eval_problems, "threads": int(cfg.threads)}
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="nanochat-baseline-") as tmp:
        export_revision(cfg.baseline_rev, Path(tmp))
        trees = {"before": Path(tmp), "after": REPO}
        for round_index in range(cfg.repeats):
            for arm in ("before", "after") if round_index % 2 == 0 else ("after", "before"):
                runs[arm].append(run_tree(trees[arm], spec))
                print(f"  round {round_index + 1}/{cfg.repeats} {arm:<6}: " + ", ".join(
                    f"{name} {s:.2f} s" for name, s in runs[arm][-1]["seconds"].items()), flush=True)
    tokens = {"kv b1": cfg.new_tokens, "kv b8": 8 * cfg.new_tokens, "kv 8 prompts": 8 * cfg.new_tokens}
    rows = []
    print()
    print(f"before = {cfg.baseline_rev}, after = this tree; d{cfg.depth}, vocab {cfg.vocab_size:,}, "
          f"{cfg.new_tokens} new tokens, "
          f"{cfg.threads} thread(s), medians of {cfg.repeats}")
    print(f"{'metric':<28} {'before':>10} {'after':>10} {'speedup':>8}")
    for name in TREE_METRICS:
        before = statistics.median(run["seconds"][name] for run in runs["before"])
        after = statistics.median(run["seconds"][name] for run in runs["after"])
        row = {"metric": name, "before_s": before, "after_s": after, "speedup": before / after,
               "before_runs_s": [run["seconds"][name] for run in runs["before"]],
               "after_runs_s": [run["seconds"][name] for run in runs["after"]]}
        if name in tokens:
            row["before_tok_per_s"], row["after_tok_per_s"] = tokens[name] / before, tokens[name] / after
            print(f"{name + ' tok/s':<28} {row['before_tok_per_s']:>10.1f} {row['after_tok_per_s']:>10.1f} "
                  f"{row['speedup']:>7.2f}x")
        else:
            label = f"{name} s ({cfg.eval_problems} problems)"
            print(f"{label:<28} {before:>10.2f} {after:>10.2f} {row['speedup']:>7.2f}x")
        rows.append(row)
    hashes = {arm: sorted({run["replies_sha256"] for run in arm_runs}) for arm, arm_runs in runs.items()}
    same_work = len(hashes["before"]) == 1 and hashes["before"] == hashes["after"]
    print(f"chat_eval replies: {'identical in both trees' if same_work else f'DIFFER: {hashes}'}")
    result = {"bench": "inference", "mode": "baseline", "baseline_rev": cfg.baseline_rev, **spec, "rounds": cfg.repeats,
              "rows": rows, "chat_eval_replies_identical": same_work}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
