"""Device, dtype, distributed init, paths, logging and seeding: once, for every script.

Fast CPU defaults (measured on 2-core machines, see README):
- glibc malloc makes small tensor ops 5-10x slower than tcmalloc, so entry points re-exec
  themselves with tcmalloc preloaded when it is installed (`fast_malloc_reexec`, called from
  `scripts/__init__.py` and `bench/__init__.py`; opt out with NANOCHAT_TCMALLOC=0);
- the thread count is chosen per workload (`--threads` overrides, 0 = auto).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

TCMALLOC_GLOBS = (
    "/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)


# ---------------------------------------------------------------------------------------------
# process setup that must happen before torch is imported

def find_tcmalloc() -> str | None:
    for pattern in TCMALLOC_GLOBS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def fast_malloc_reexec(package: str) -> None:
    """Re-exec this process with tcmalloc preloaded, if available and not already loaded.

    Only for processes started as `python -m <package>.<module>` (sys.orig_argv keeps the
    command line); never inside a test run (pytest imports the same modules) or a REPL.
    """
    if os.environ.get("NANOCHAT_TCMALLOC", "1") == "0" or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    argv = getattr(sys, "orig_argv", [])
    if len(argv) < 3 or argv[1] != "-m" or not argv[2].startswith(package + ".") or sys.platform != "linux":
        return
    lib = find_tcmalloc()
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = (lib + " " + env.get("LD_PRELOAD", "")).strip()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


# ---------------------------------------------------------------------------------------------
# paths and logging

def get_base_dir() -> Path:
    """Where every artifact lives: $NANOCHAT_BASE_DIR, default ~/.cache/nanochat."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: Path, write: Any) -> None:
    """Write a file through write(f) on a temp file in the same directory, fsync, then rename:
    readers see the old file or the complete new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_jsonl(path: Path | str, error: type[Exception] = ValueError) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) for each non-blank line; a bad line raises `error` naming
    the file and line."""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{line_number}: not valid JSON ({e.msg} at column {e.colno})") from None


def get_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def get_logger(name: str = "nanochat") -> logging.Logger:
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"[rank {get_rank()}] %(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return logger


def fail(message: str, status: int = 1) -> None:
    """Stop a script with one clear line on stderr and a non-zero exit status."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


# ---------------------------------------------------------------------------------------------
# torch: device, dtype, threads, seeding, distributed

def autodetect_device_type(override: str = "") -> str:
    """'cuda' if available, else 'mps', else 'cpu'; `override` (cuda|mps|cpu) wins."""
    import torch

    if override:
        if override not in ("cuda", "mps", "cpu"):
            raise ValueError(f"device must be one of cuda|mps|cpu, got {override!r}")
        if override == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
        if override == "mps" and not torch.backends.mps.is_available():
            raise ValueError("device 'mps' requested but MPS is not available")
        return override
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(device_type: str, override: str = "auto") -> "torch.dtype":
    """Compute dtype for matmuls: bf16 on CUDA and on CPUs with native bf16 (AVX-512 BF16/AMX),
    float32 elsewhere (MPS, older CPUs). `override`: auto|float32|bfloat16."""
    import torch

    if override == "float32":
        return torch.float32
    if override == "bfloat16":
        return torch.bfloat16
    if override != "auto":
        raise ValueError(f"dtype must be auto|float32|bfloat16, got {override!r}")
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device_type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def set_cpu_threads(threads: int) -> int:
    """Set torch's intra-op threads; 0 = all cores. Returns the count in use."""
    import torch

    n = threads if threads > 0 else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class RunContext:
    """What every script needs to know about where and how it runs."""

    device: "torch.device"
    device_type: str
    dtype: "torch.dtype"
    ddp: bool
    rank: int
    local_rank: int
    world_size: int

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """Autocast context for forward passes (no-op when computing in float32)."""
        import contextlib

        import torch

        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def synchronize(self) -> None:
        import torch

        if self.device_type == "cuda":
            torch.cuda.synchronize()


def compute_init(device: str = "", dtype: str = "auto", seed: int = 42, threads: int = 0) -> RunContext:
    """Device + dtype + seeding + torch.distributed from torchrun's environment.

    Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) the process group is created with NCCL on
    CUDA and gloo elsewhere, with a finite collective timeout (nanochat.distributed). Every rank
    gets the same seed: model init must agree across ranks; data differs by rank through the
    dataloader, not through the seed.
    """
    import torch
    import torch.distributed as dist

    device_type = autodetect_device_type(device)
    ddp = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    rank = int(os.environ.get("RANK", 0)) if ddp else 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if ddp else 0
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if ddp else 1
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device_type)
    if device_type == "cpu":
        set_cpu_threads(threads if threads > 0 else max(1, (os.cpu_count() or 1) // max(1, world_size)))
    if ddp and world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        from nanochat.distributed import init_process_group

        init_process_group(backend, dev if device_type == "cuda" else None)
    seed_everything(seed)
    return RunContext(dev, device_type, resolve_dtype(device_type, dtype), ddp and world_size > 1, rank, local_rank, world_size)


def compute_cleanup() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# experiment tracking

class DummyWandb:
    """Stands in for a wandb run when WANDB_RUN is unset or 'dummy'."""

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass

    def finish(self) -> None:
        pass


def init_wandb(project: str, config: dict[str, Any], master: bool = True) -> Any:
    """A wandb run when WANDB_RUN is set (and not 'dummy') on the master process, else a no-op."""
    run_name = os.environ.get("WANDB_RUN", "dummy")
    if run_name == "dummy" or not master:
        return DummyWandb()
    try:
        import wandb
    except ImportError:
        fail("WANDB_RUN is set but wandb is not installed: pip install wandb (or unset WANDB_RUN)")
    return wandb.init(project=project, name=run_name, config=config)
