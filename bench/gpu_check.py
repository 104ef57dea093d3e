"""GPU check: does every CUDA path run, and are the memory plan and the speed figures right? Rows
that cannot lose their numbers: each row's failure is recorded in that row and the check goes on,
and the summary JSON is rewritten after every row (and when interrupted).

    python -m bench.gpu_check --device=cuda    # one CUDA card: d12 x 8192 tokens; budgeted at 7 min
                                               # (--time_budget_s=420) plus start-up, under 8 min;
                                               # not yet run on a GPU
    python -m bench.gpu_check --device=cpu --dtype=bfloat16 --depth=1 --seq_len=32 --vocab_size=128 \\
        --molegrad_rank_k=8 --steps=1 --warmup=1 --threads=1 --compile_backend=aot_eager   # tiny (tests)

Rows, in this order (each under --row_timeout_s; a row that would start after --time_budget_s is
recorded as skipped, with the reason):
- env (always runs): torch / CUDA / cuDNN versions, device name and capability, native bf16
  (is_bf16_supported(including_emulation=False)), the SDPA kernel torch._fused_sdp_choice picks
  for causal (1, H, T, 128) bf16 and fp32 (unrestricted, and as training pins it), the CUDA
  context size (free memory before and while a second process holds its context), the allocator
  setting (compute_init sets expandable segments before CUDA starts), and the memory budget: free
  memory before this process, less the context, less a reserve of max(2 GiB, 5% of the card)
  (memory_budget).
- audit <mode>: one forward (under the device's autocast) and backward of a depth-2 model per
  memory mode inside AutocastAudit: an fp32 (N, 4d) tensor, or the math attention kernel, is a
  violation.
- train d<depth> <mode> eager, for every mode (--modes): --warmup + --steps optimizer steps of
  --grad_accum micro-batches of one sequence; planned peak (nanochat.memory.plan_memory) vs
  torch.cuda.max_memory_allocated and max_memory_reserved (on CPU: the allocated peak of one more
  step, memory_measure.AllocationTracker; no reserved), the plan's error in percent, median
  tokens/s and MFU (GPT.estimate_flops / common.peak_flops).
- train deepest lowest eager: the same, at the deepest depth whose lowest plan fits the budget
  (--deepest; on CPU only with --gpu_memory).
- pipeline: a tiny local corpus and tokenizer, base_train with --save_every and a resume from
  that step, chat_sft, chat_rl, chat_eval and chat_cli, each a `python -m` child on this device
  in a temporary NANOCHAT_BASE_DIR (--pipeline).
- train d<depth> <mode> <backend>: compiled (--compile_backend, inductor on a GPU) for
  --compile_modes (dense and low): last, as the longest rows.

Printed: a line per row as it ends, then the table, then the summary as one JSON line (also in
--out). Exit status 1 when a row failed or the audit found a violation.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch.nn.attention import SDPBackend
from torch.utils._python_dispatch import TorchDispatchMode

from bench.runner import REPO, provenance, write_json
from nanochat.common import RunContext, compute_init, cpu_has_native_bf16, get_base_dir, peak_flops, print0
from nanochat.config import RuntimeFlags, check, parse_args
from nanochat.gpt import GPT, GPTConfig, config_from_depth, training_attention_backend
from nanochat.memory import GiB, format_size, gpu_bytes, memory_reserve, plan_memory
from nanochat.memory_measure import AllocationTracker, optimizer_held
from nanochat.model_flags import MEMORY_MODES, MEMORY_SETTINGS, MOLEGRAD_PRESETS, MemoryFlags
from nanochat.optim import setup_optimizers
from nanochat.trainer import train_step

# --modes=all: the MoleGrad presets low, lowest, keep_h; the practitioner stack standard and low_bf16 (bf16 weights
# with stochastic rounding and 8-bit states: their CUDA paths, and their plans)
MODES = ("dense", "recompute_block", "molegrad_ffn", *MOLEGRAD_PRESETS, "standard", "low_bf16")
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}  # nanochat.memory's --dtype
AUDIT_DEPTH = 2  # the audit's model: width 128, 2 heads of 64
AUDIT_MAX_SEQ_LEN = 256
SDPA_HEAD_DIM = 128  # the env row's SDPA probe: (1, H, T, 128)
# the math SDPA kernel is CompositeImplicitAutograd: a dispatch mode sees its decomposition, whose
# mark is _safe_softmax (no other op of a training step calls it); MPS has a kernel of its own
MATH_ATTENTION_OPS = ("aten::_scaled_dot_product_attention_math", "aten::_safe_softmax")

# the tiny pipeline: a local corpus and tokenizer, then each stage as run10.sh runs it, at tiny
# sizes; (row, `python -m` argv, rows it needs). The training stages add the memory flags and every
# stage but the data one the runtime flags (pipeline_commands).
PIPELINE_TAG = "tiny"
PIPELINE_DATA = [["nanochat.dataset", "--source=local", "--target_mb=2", "--shard_mb=1"],
                 ["scripts.tok_train", "--vocab_size=512", "--max_chars=300000"]]
PIPELINE_BASE = ["scripts.base_train", "--depth=1", "--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=256",
                 "--num_iterations=4", "--save_every=2", "--keep_checkpoints=0", "--eval_every=-1", "--eval_tokens=512",
                 "--sample_every=-1", f"--model_tag={PIPELINE_TAG}"]
PIPELINE_STAGES = [
    ("pipeline base_train", PIPELINE_BASE, ("pipeline data",)),
    ("pipeline base_train resume", PIPELINE_BASE + ["--resume_from_step=2"], ("pipeline base_train",)),
    ("pipeline chat_sft", ["scripts.chat_sft", "--source=base", f"--source_tag={PIPELINE_TAG}", f"--model_tag={PIPELINE_TAG}",
                           "--max_seq_len=128", "--device_batch_size=4", "--examples_per_step=8", "--num_iterations=2",
                           "--eval_every=-1", "--eval_examples=8", "--eval_metrics_max_problems=4", "--task_source=offline"],
     ("pipeline base_train",)),
    ("pipeline chat_rl", ["scripts.chat_rl", "--source=sft", f"--source_tag={PIPELINE_TAG}", f"--model_tag={PIPELINE_TAG}",
                          "--task=arithmetic", "--max_seq_len=96", "--examples_per_step=2", "--num_samples=2",
                          "--max_new_tokens=12", "--device_batch_size=4", "--num_iterations=2", "--eval_every=-1",
                          "--eval_examples=2"], ("pipeline chat_sft",)),
    ("pipeline chat_eval", ["scripts.chat_eval", "-i", "sft", "-c", PIPELINE_TAG, "-a", "ARC-Easy,GSM8K", "--max_problems=4",
                            "--max_new_tokens=16", "--task_source=offline"], ("pipeline chat_sft",)),
    ("pipeline chat_cli", ["scripts.chat_cli", "-i", "sft", "-c", PIPELINE_TAG, "-p", "What is 2 + 2?", "--max_tokens=16",
                           "-t", "0"], ("pipeline chat_sft",)),
]
PIPELINE_TRAINING = ("scripts.base_train", "scripts.chat_sft", "scripts.chat_rl")
PIPELINE_RANK_K = 8  # MoleGrad's rank in the tiny pipeline (width 64)


@dataclass
class GpuCheckConfig(MemoryFlags, RuntimeFlags):
    """Env, autocast audit, planned vs measured memory, tok/s and MFU per mode, tiny pipeline: a row each.

    Every row is recorded whatever happens in it; the summary is rewritten after each."""

    compile_refused: ClassVar[str] = "the check compiles its own rows (--compile_backend)"
    depth: int = field(default=12, metadata={"help": "depth of the train rows"})
    seq_len: int = field(default=8192, metadata={"help": "tokens per sequence (one sequence per micro-batch)"})
    vocab_size: int = field(default=65536, metadata={"help": "vocabulary"})
    modes: str = field(default="all", metadata={"help": f"comma-separated memory settings, from {'|'.join(MEMORY_SETTINGS)}, "
                                                        f"or all ({','.join(MODES)})"})
    grad_accum: int = field(default=2, metadata={"help": "micro-batches per optimizer step in the train rows"})
    steps: int = field(default=3, metadata={"help": "timed optimizer steps per train row"})
    warmup: int = field(default=1, metadata={"help": "untimed optimizer steps first (compilation happens here)"})
    compile_backend: str = field(default="inductor", metadata={"help": "torch.compile backend of the compiled rows "
                                                                         "(empty = no compiled rows)"})
    compile_modes: str = field(default="dense,low", metadata={"help": "comma-separated memory settings compiled"})
    deepest: bool = field(default=True, metadata={"help": "also the deepest depth whose lowest plan fits the budget"})
    gpu_memory: str = field(default="", metadata={"help": "free memory to budget with, e.g. 32GB (empty = measured "
                                                          "on CUDA; on CPU: no budget, no deepest row)"})
    audit: bool = field(default=True, metadata={"help": "the autocast audit rows"})
    pipeline: bool = field(default=True, metadata={"help": "the tiny pipeline rows (python -m children)"})
    pipeline_memory_mode: str = field(default="low", metadata={"help": "--memory_mode of the pipeline's training stages",
                                                               "choices": ("custom", *MEMORY_MODES)})
    row_timeout_s: float = field(default=240.0, metadata={"help": "wall-clock limit of one row"})
    time_budget_s: float = field(default=420.0, metadata={"help": "no row starts after this many seconds, and none "
                                                                  "runs past it"})
    out: str = field(default="", metadata={"help": "summary JSON (empty = <base dir>/gpu_check.json)"})

    def validate(self) -> None:
        super().validate()
        for name in ("depth", "seq_len", "steps", "grad_accum"):
            check(getattr(self, name) >= 1, f"--{name}: expected >= 1, got {getattr(self, name)}")
        check(self.vocab_size >= 2, f"--vocab_size: expected >= 2, got {self.vocab_size}")
        check(self.warmup >= 0, f"--warmup: expected >= 0, got {self.warmup}")
        check(self.row_timeout_s > 0, f"--row_timeout_s: expected > 0, got {self.row_timeout_s}")
        for flag, names in (("modes", self.mode_names()), ("compile_modes", self.compile_mode_names())):
            unknown = [name for name in names if name not in MEMORY_SETTINGS]
            check(not unknown, f"--{flag}: unknown mode(s) {', '.join(unknown)}; expected some of {'|'.join(MEMORY_SETTINGS)}"
                               + (" or all" if flag == "modes" else ""))
        if self.gpu_memory:
            try:
                gpu_bytes(self.gpu_memory)
            except ValueError as e:
                check(False, f"--gpu_memory: {e}")
        for name in {*self.mode_names(), *self.compile_mode_names(), "lowest"}:
            MemoryFlags.validate(mode_flags(name, self))  # a flag against the mode's preset: ConfigError

    def mode_names(self) -> list[str]:
        return list(MODES) if self.modes == "all" else [name for name in self.modes.split(",") if name]

    def compile_mode_names(self) -> list[str]:
        return [name for name in self.compile_modes.split(",") if name] if self.compile_backend else []


# ---------------------------------------------------------------------------------------------
# rows: each runs under a wall-clock limit; whatever it raises becomes its error

class RowTimeout(Exception):
    """A row ran past its wall-clock limit."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """RowTimeout in this (the main) thread once `seconds` have passed; another thread runs unlimited.
    A timer already armed (pytest-timeout's) is suspended meanwhile and re-armed with what it had left."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise RowTimeout(f"over the row's {seconds:.3g} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    outer_left, outer_interval = signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-3), outer_interval)


def error_text(e: BaseException) -> str:
    """'Type: message', the message on one line and cut to 200 characters."""
    message = " ".join(str(e).split())
    return f"{type(e).__name__}: {message[:200]}" if message else type(e).__name__


def release_memory(ctx: RunContext) -> None:
    """What a finished (or failed) row leaves: garbage, compiled graphs, the CUDA allocator's cache."""
    gc.collect()
    if "torch._dynamo" in sys.modules:  # imported by a compiled row (importing it takes seconds)
        torch._dynamo.reset()
    if ctx.device_type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


@dataclass
class Row:
    name: str
    body: Callable[[], dict[str, Any]]
    needs: tuple[str, ...] = ()  # rows that must have succeeded first
    skip: str = ""  # why it does not run, known when the rows are planned


def run_row(row: Row, limit_s: float, ctx: RunContext) -> dict[str, Any]:
    """The row's results, or its error ('Type: message'); its wall time in `seconds`."""
    start = time.perf_counter()
    try:
        with time_limit(limit_s):
            result = {**row.body(), "error": None}
    except Exception as e:  # noqa: BLE001: any failure is this row's result; KeyboardInterrupt stops the check
        result = {"error": error_text(e)}
    finally:
        release_memory(ctx)
    return {"row": row.name, **result, "seconds": round(time.perf_counter() - start, 2)}


# ---------------------------------------------------------------------------------------------
# the environment and the memory budget

def memory_budget(free: int, context: int, total: int) -> dict[str, int]:
    """Bytes a training process may plan for: `free` memory before it starts, less its own CUDA
    context, less a reserve of max(2 GiB, 5% of the card's `total`) for cuBLAS and attention
    workspaces, allocator fragmentation and what the plan leaves out."""
    reserve = memory_reserve(total)
    return {"free_bytes": free, "context_bytes": context, "reserve_bytes": reserve, "total_bytes": total,
            "budget_bytes": free - context - reserve}


# a fresh process's free memory once its CUDA context exists
CONTEXT_PROBE = "import sys, torch; print(torch.cuda.mem_get_info(int(sys.argv[1]))[0])"


def measure_context_bytes(device: torch.device) -> int:
    """Bytes one CUDA context takes on `device`: free memory (mem_get_info) here, before and while a
    second process holds its context (this process holds its own already, and no tensors yet)."""
    torch.cuda.synchronize(device)
    before = torch.cuda.mem_get_info(device)[0]
    probe = subprocess.run([sys.executable, "-c", CONTEXT_PROBE, str(device.index or 0)], capture_output=True, text=True,
                           timeout=120)
    if probe.returncode != 0:
        raise RuntimeError(f"the context probe failed: {probe.stderr.strip()[-300:]}")
    return before - int(probe.stdout.split()[-1])


def sdpa_choices(ctx: RunContext, n_head: int, seq_len: int) -> dict[str, str]:
    """The SDPA kernel of a causal (1, n_head, seq_len, 128) attention with gradients, in bf16 and
    fp32: as torch._fused_sdp_choice picks it unrestricted, and as training pins it (gpt.py)."""
    choices = {}
    for dtype in (torch.bfloat16, torch.float32):
        q = torch.empty(1, n_head, seq_len, SDPA_HEAD_DIM, device=ctx.device, dtype=dtype, requires_grad=True)
        name = DTYPE_NAMES[dtype]
        choices[f"{name}_default"] = SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=True)).name
        choices[f"{name}_training"] = training_attention_backend(ctx.device, dtype, n_head, SDPA_HEAD_DIM, seq_len)
    return choices


def environment(cfg: GpuCheckConfig, ctx: RunContext, cuda_started_here: bool) -> dict[str, Any]:
    """The env row: versions, device, bf16, SDPA kernels, the context and the memory budget (CUDA,
    or --gpu_memory: then that is the free memory, and the card's)."""
    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
                           "compute_dtype": DTYPE_NAMES[ctx.dtype]}
    free = total = context = 0
    if ctx.device_type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        env.update(device=props.name, capability=list(torch.cuda.get_device_capability(ctx.device)),
                   cudnn=torch.backends.cudnn.version(), bf16_native=torch.cuda.is_bf16_supported(including_emulation=False),
                   multiprocessors=props.multi_processor_count,
                   # compute_init's setting applies only if CUDA started there
                   alloc_conf=os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
                   cuda_started_by_check=cuda_started_here)
        try:
            context = measure_context_bytes(ctx.device)
        except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as e:
            env["context_error"] = error_text(e)  # the budget stays right: free + 0 - 0
        free, total = torch.cuda.mem_get_info(ctx.device)
        free += context  # before this process started: what it sees now, and its own context
    else:
        env.update(device=ctx.device_type, capability=None, bf16_native=ctx.device_type == "cpu" and cpu_has_native_bf16())
    if cfg.gpu_memory:
        free = total = gpu_bytes(cfg.gpu_memory)
    env["budget"] = memory_budget(free, context, total) if total else None
    n_head = config_from_depth(cfg.depth, cfg.vocab_size, cfg.seq_len).n_head
    env["sdpa"] = sdpa_choices(ctx, n_head, cfg.seq_len)
    return env


# ---------------------------------------------------------------------------------------------
# the autocast audit

class AutocastAudit(TorchDispatchMode):
    """Records, while active, what a training step under autocast must not do: return a float32
    tensor of `tokens` x `hidden` elements with last dim `hidden` (the MLP's (N, 4d) activation,
    which the memory plan counts in the compute dtype), or run the math attention kernel (it keeps
    (B, H, T, T) per layer). The fused attention kernels that ran are listed too."""

    def __init__(self, tokens: int, hidden: int) -> None:
        super().__init__()
        self.tokens, self.hidden = tokens, hidden
        self.fp32_hidden: set[str] = set()
        self.math_attention: set[str] = set()
        self.attention_kernels: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.name()
        if name.startswith(MATH_ATTENTION_OPS):
            self.math_attention.add(name)
        elif "scaled_dot_product" in name:
            self.attention_kernels.add(name)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() >= 2 and t.shape[-1] == self.hidden
                    and t.numel() == self.tokens * self.hidden):
                self.fp32_hidden.add(f"{name} {tuple(t.shape)}")
        return out


def autocast_audit(forward: Callable[[], torch.Tensor], tokens: int, n_embd: int, ctx: RunContext) -> dict[str, Any]:
    """forward() (a training forward of `tokens` tokens, returning the loss) under ctx.autocast(),
    then the loss's backward, inside AutocastAudit(tokens, 4 * n_embd). Returns the fp32 (N, 4d)
    outputs and math attention ops found ('violations': how many), and the attention kernels that ran."""
    if tokens == n_embd:
        raise ValueError(f"tokens={tokens}: expected a count other than n_embd, or a (d, 4d) weight looks like (N, 4d)")
    with AutocastAudit(tokens, 4 * n_embd) as audit:
        with ctx.autocast():
            loss = forward()
        loss.backward()
    return {"fp32_hidden": sorted(audit.fp32_hidden), "math_attention": sorted(audit.math_attention),
            "attention_kernels": sorted(audit.attention_kernels),
            "violations": len(audit.fp32_hidden) + len(audit.math_attention)}


def audit_mode(name: str, cfg: GpuCheckConfig, ctx: RunContext) -> dict[str, Any]:
    """The audit row of one memory mode: a depth-2 model, one sequence of up to 256 tokens."""
    seq_len = min(cfg.seq_len, AUDIT_MAX_SEQ_LEN)
    config = config_from_depth(AUDIT_DEPTH, cfg.vocab_size, seq_len, **mode_flags(name, cfg).memory_options())
    if cfg.vocab_size == 4 * config.n_embd:
        raise ValueError(f"--vocab_size={cfg.vocab_size}: the audit needs a vocabulary other than 4 x its width "
                         f"{config.n_embd}, or the fp32 logits look like the MLP's activation")
    batch = 2 if seq_len == config.n_embd else 1
    torch.manual_seed(cfg.seed)
    with torch.device(ctx.device):
        model = GPT(config)
    setup_optimizers(model, **mode_flags(name, cfg).precision_options(), seed=cfg.seed)  # weights as training keeps them
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(cfg.seed))
    tokens = tokens.to(ctx.device)
    return {"mode": name, **autocast_audit(lambda: model(tokens[:, :-1], tokens[:, 1:]), batch * seq_len, config.n_embd, ctx)}


# ---------------------------------------------------------------------------------------------
# training rows: planned vs measured memory, tokens/s, MFU

def mode_flags(name: str, cfg: GpuCheckConfig) -> GpuCheckConfig:
    """The check's flags with the memory setting MEMORY_SETTINGS[name] applied (MoleGrad at
    --molegrad_rank_k): its .memory_options() build the model, its .precision_options() the optimizers."""
    return replace(cfg, **MEMORY_SETTINGS[name])


def mode_config(name: str, depth: int, cfg: GpuCheckConfig) -> GPTConfig:
    return config_from_depth(depth, cfg.vocab_size, cfg.seq_len, **mode_flags(name, cfg).memory_options())


def planned_peak(name: str, depth: int, cfg: GpuCheckConfig, ctx: RunContext) -> int:
    """The planned peak of memory setting `name` at `depth`, its precision options included."""
    return plan_memory(mode_config(name, depth, cfg), 1, DTYPE_NAMES[ctx.dtype], grad_accum_steps=cfg.grad_accum,
                       device_type=ctx.device_type, **mode_flags(name, cfg).precision_options()).peak


def deepest_lowest_depth(budget: int, cfg: GpuCheckConfig, ctx: RunContext) -> int:
    """The deepest depth whose planned lowest-mode peak fits `budget` bytes (0 = none)."""
    deepest = 0
    for depth in range(1, 129):
        if planned_peak("lowest", depth, cfg, ctx) > budget:
            break
        deepest = depth
    return deepest


def deepest_row(budget: dict[str, int], cfg: GpuCheckConfig, ctx: RunContext) -> dict[str, Any]:
    """train_row of the lowest mode at the deepest depth that fits the budget, when deeper than --depth."""
    depth = deepest_lowest_depth(budget["budget_bytes"], cfg, ctx)
    if depth <= cfg.depth:
        return {"depth": depth, "skipped": f"the deepest lowest depth that fits {format_size(budget['budget_bytes'])}, "
                                           f"d{depth}, is not deeper than --depth={cfg.depth}"}
    return train_row("lowest", depth, "", cfg, ctx)


def percent_error(planned: int, measured: int | None) -> float | None:
    """How far the plan is off the measurement, in percent (+: planned more than measured)."""
    return 100 * (planned / measured - 1) if measured else None


def train_row(name: str, depth: int, backend: str, cfg: GpuCheckConfig, ctx: RunContext) -> dict[str, Any]:
    """--warmup + --steps optimizer steps of --grad_accum one-sequence micro-batches on random tokens:
    the plan, the measured peaks beyond what was allocated before the model was built, median
    tokens/s and MFU."""
    config = mode_config(name, depth, cfg)
    planned = planned_peak(name, depth, cfg, ctx)
    cuda = ctx.device_type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base_allocated, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    torch.manual_seed(cfg.seed)
    with torch.device(ctx.device):
        model = GPT(config)
    optimizers = setup_optimizers(model, **mode_flags(name, cfg).precision_options(), seed=cfg.seed)
    runner = torch.compile(model, backend=backend, dynamic=False) if backend else model
    generator = torch.Generator().manual_seed(cfg.seed)

    def batches():
        while True:
            tokens = torch.randint(0, config.vocab_size, (1, config.sequence_len + 1), generator=generator).to(ctx.device)
            yield tokens[:, :-1], tokens[:, 1:]

    stream, times = batches(), []
    for _ in range(cfg.warmup + cfg.steps):
        start = time.perf_counter()
        train_step(runner, optimizers, stream, cfg.grad_accum, ctx)
        ctx.synchronize()
        times.append(time.perf_counter() - start)
    if cuda:
        allocated = torch.cuda.max_memory_allocated() - base_allocated
        reserved = torch.cuda.max_memory_reserved() - base_reserved
    else:  # one more step, eager, counted as CUDA counts allocations (no allocator cache: nothing reserved)
        with AllocationTracker([*model.parameters(), *model.buffers(), *optimizer_held(optimizers)]) as tracker:
            train_step(model, optimizers, stream, cfg.grad_accum, ctx)
        allocated, reserved = tracker.peak, None
    tokens_per_step = cfg.grad_accum * config.sequence_len
    tok_per_s = tokens_per_step / statistics.median(times[cfg.warmup:])
    return {"depth": depth, "mode": name, "compile": backend or "eager", "params": model.num_params(),
            "tokens_per_step": tokens_per_step, "planned_bytes": planned, "allocated_bytes": allocated,
            "reserved_bytes": reserved, "allocated_error_pct": percent_error(planned, allocated),
            "reserved_error_pct": percent_error(planned, reserved), "tok_per_s": tok_per_s,
            "mfu": 100 * tok_per_s * model.estimate_flops() / peak_flops(ctx)}


# ---------------------------------------------------------------------------------------------
# the tiny pipeline, each stage a child process

def run_module(argv: list[str], base_dir: Path) -> dict[str, Any]:
    """`python -m argv...` in the repository with NANOCHAT_BASE_DIR=base_dir; RuntimeError naming the
    child's last stderr line when it fails."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "WANDB_RUN": "dummy"}
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()] or ["(no stderr)"]
        raise RuntimeError(f"{lines[-1].strip()} (python -m {argv[0]}: exit status {proc.returncode})")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return {"command": f"python -m {' '.join(argv)}", "last_line": lines[-1][:200] if lines else ""}


def pipeline_commands(cfg: GpuCheckConfig, ctx: RunContext) -> list[tuple[str, list[list[str]], tuple[str, ...]]]:
    """(row, commands, rows it needs) of the tiny pipeline on this device and compute dtype."""
    runtime = [f"--device={ctx.device_type}", f"--dtype={cfg.dtype}", f"--threads={cfg.threads}"]
    memory = [f"--memory_mode={cfg.pipeline_memory_mode}", f"--molegrad_rank_k={PIPELINE_RANK_K}"]
    rows: list[tuple[str, list[list[str]], tuple[str, ...]]] = [("pipeline data", PIPELINE_DATA, ())]
    for name, argv, needs in PIPELINE_STAGES:
        rows.append((name, [argv + runtime + (memory if argv[0] in PIPELINE_TRAINING else [])], needs))
    return rows


# ---------------------------------------------------------------------------------------------
# the summary: written after every row, printed at the end

class Summary:
    """The check's results: rewritten to `path` (atomically) after every row."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path, self.start = path, time.perf_counter()
        self.data: dict[str, Any] = {"bench": "gpu_check", **header, "rows": [], "complete": False, "interrupted": None,
                                     "error": None, "seconds": 0.0, "out": str(path)}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def add(self, row: dict[str, Any]) -> None:
        self.data["rows"].append(row)
        print0(format_row(row))
        self.write()

    def row(self, name: str) -> dict[str, Any] | None:
        return next((row for row in self.data["rows"] if row["row"] == name), None)

    def write(self) -> None:
        rows = self.data["rows"]
        self.data.update(seconds=round(self.elapsed(), 1), errors=sum(1 for r in rows if r.get("error")),
                         violations=sum(r.get("violations", 0) for r in rows))
        self.data["ok"] = self.data["complete"] and not self.data["errors"] and not self.data["violations"]
        write_json(self.path, self.data)


def format_row(row: dict[str, Any]) -> str:
    """One line of the table: the row's name, then its numbers, its error or why it was skipped."""
    size = lambda n: format_size(n) if n is not None else "-"  # noqa: E731
    pct = lambda p: f"{p:+.1f}%" if p is not None else "-"  # noqa: E731
    if row.get("skipped"):
        detail = f"skipped: {row['skipped']}"
    elif row.get("error"):
        detail = f"ERROR {row['error']}"
    elif "planned_bytes" in row:
        detail = (f"planned {size(row['planned_bytes'])}, allocated {size(row['allocated_bytes'])} "
                  f"({pct(row['allocated_error_pct'])}), reserved {size(row['reserved_bytes'])} "
                  f"({pct(row['reserved_error_pct'])}), {row['tok_per_s']:,.0f} tok/s, MFU {row['mfu']:.1f}%")
    elif "violations" in row:
        found = row["fp32_hidden"] + row["math_attention"]
        detail = (f"{row['violations']} violation(s): {'; '.join(found)}" if found else "ok") + \
                 f" (attention: {', '.join(row['attention_kernels']) or 'none seen'})"
    elif row["row"] == "env":
        budget = row.get("budget")
        detail = (f"{row['device']} capability {row['capability']}, torch {row['torch']} CUDA {row['cuda']}, "
                  f"bf16 native {row['bf16_native']}, SDPA {row['sdpa']}"
                  + (f", budget {size(budget['budget_bytes'])} (context {size(budget['context_bytes'])}, "
                     f"reserve {size(budget['reserve_bytes'])})" if budget else ""))
    else:
        detail = row.get("last_line", "ok")
    return f"{row['row']:<34}{row.get('seconds', 0):>7.1f}s  {detail}"


def print_table(summary: dict[str, Any]) -> None:
    print0(f"gpu check on {summary.get('device', '?')}: {len(summary['rows'])} rows, {summary['errors']} error(s), "
           f"{summary['violations']} audit violation(s), {summary['seconds']:.0f} s"
           + ("" if summary["complete"] else f"; INCOMPLETE ({summary['interrupted'] or summary['error']})"))
    print0(f"{'row':<34}{'time':>8}  result")
    for row in summary["rows"]:
        print0(format_row(row))


# ---------------------------------------------------------------------------------------------
# the check

def plan_rows(cfg: GpuCheckConfig, ctx: RunContext, budget: dict[str, int] | None, base_dir: Path) -> list[Row]:
    """The rows after env, in order: audit, eager train rows, the deepest, the pipeline, compiled rows."""
    rows = []
    if cfg.audit:
        no_autocast = "" if ctx.dtype == torch.bfloat16 else f"compute dtype {DTYPE_NAMES[ctx.dtype]}: nothing is autocast"
        rows += [Row(f"audit {name}", lambda name=name: audit_mode(name, cfg, ctx), skip=no_autocast)
                 for name in cfg.mode_names()]
    rows += [Row(f"train d{cfg.depth} {name} eager", lambda name=name: train_row(name, cfg.depth, "", cfg, ctx))
             for name in cfg.mode_names()]
    if cfg.deepest and (budget is not None or ctx.device_type == "cuda"):
        rows.append(Row("train deepest lowest eager", lambda: deepest_row(budget, cfg, ctx),
                        skip="" if budget is not None else "no memory budget: the env row failed"))
    if cfg.pipeline:
        for name, commands, needs in pipeline_commands(cfg, ctx):
            rows.append(Row(name, lambda commands=commands: [run_module(argv, base_dir) for argv in commands][-1], needs))
    rows += [Row(f"train d{cfg.depth} {name} {cfg.compile_backend}",
                 lambda name=name: train_row(name, cfg.depth, cfg.compile_backend, cfg, ctx))
             for name in cfg.compile_mode_names()]
    return rows


def skip_reason(row: Row, summary: Summary, cfg: GpuCheckConfig) -> str:
    """Why `row` does not start (empty: it does)."""
    if row.skip:
        return row.skip
    if summary.elapsed() >= cfg.time_budget_s:
        return f"time budget: {summary.elapsed():.0f} s of --time_budget_s={cfg.time_budget_s:.0f} used"
    for need in row.needs:
        done = summary.row(need)
        if done is None or done.get("error") or done.get("skipped"):
            return f"needs {need}, which {'failed' if done and done.get('error') else 'did not run'}"
    return ""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(GpuCheckConfig, argv, prog="python -m bench.gpu_check")
    cuda_before = torch.cuda.is_initialized()  # then compute_init's allocator setting comes too late
    summary = Summary(Path(cfg.out) if cfg.out else get_base_dir() / "gpu_check.json",
                      {"config": asdict(cfg), "provenance": provenance(argv, "bench.gpu_check")})
    main_thread = threading.current_thread() is threading.main_thread()
    stop = signal.signal(signal.SIGTERM, signal.default_int_handler) if main_thread else None  # SIGTERM: as Ctrl-C
    current = "setup"
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as base_dir:
            ctx = compute_init(cfg)
            current = "env"
            env = run_row(Row("env", lambda: environment(cfg, ctx, not cuda_before)), cfg.row_timeout_s, ctx)
            summary.data.update({key: env.get(key) for key in ("torch", "cuda", "device", "capability", "bf16_native",
                                                               "budget")})
            summary.add(env)
            for row in plan_rows(cfg, ctx, env.get("budget"), Path(base_dir)):
                current = row.name
                reason = skip_reason(row, summary, cfg)
                if reason:
                    summary.add({"row": row.name, "skipped": reason, "error": None, "seconds": 0.0})
                    continue
                summary.add(run_row(row, min(cfg.row_timeout_s, cfg.time_budget_s - summary.elapsed()), ctx))
            summary.data["complete"] = True
    except KeyboardInterrupt:
        summary.data["interrupted"] = f"interrupted during {current}"
    except Exception as e:  # noqa: BLE001: a failure outside the rows (device setup) is the summary's error
        summary.data["error"] = f"{current}: {error_text(e)}"
    finally:
        if stop is not None:
            signal.signal(signal.SIGTERM, stop)
        summary.write()
        print_table(summary.data)
        print0(json.dumps(summary.data))
    if summary.data["interrupted"]:
        raise SystemExit(130)
    return summary.data


if __name__ == "__main__":
    raise SystemExit(0 if main()["ok"] else 1)
