"""Device, dtype, distributed init, paths, logging, seeding, the error wrapper, the MFU
denominator and experiment tracking: once, for every script.

CPU threads: 0 = all cores, split among the ranks on this machine (`--threads` overrides).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, TypeVar

from nanochat import distributed
from nanochat.config import DTYPES, ConfigError, RuntimeFlags, UserError, check_device

T = TypeVar("T")

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


def fail(message: str, status: int = 1) -> NoReturn:
    """Stop a script with one clear line on stderr and a non-zero exit status."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def run_main(body: Callable[..., T], cfg: Any) -> T:
    """The body of every entry point's main(): the one error wrapper.

    With RuntimeFlags in `cfg`, sets up the run first (compute_init) and calls body(cfg, ctx),
    else body(cfg). An expected failure (UserError, a missing file, a bad value; a lost peer under
    torchrun included) becomes one `error:` line on stderr and exit status 1; the process group is
    always cleaned up.
    """
    try:
        if isinstance(cfg, RuntimeFlags):
            return body(cfg, compute_init(cfg))
        return body(cfg)
    except (UserError, FileNotFoundError, ValueError) as e:
        fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    finally:
        compute_cleanup()


# ---------------------------------------------------------------------------------------------
# torch: device, dtype, threads, seeding, distributed

def autodetect_device_type(override: str = "") -> str:
    """'cuda' if available, else 'mps', else 'cpu'; `override` (cuda|mps|cpu) wins."""
    import torch

    if override:
        check_device(override)
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
        raise ConfigError(f"--dtype: expected one of {'|'.join(DTYPES)}, got {override!r}")
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


def compute_init(flags: RuntimeFlags | None = None, **overrides: Any) -> RunContext:
    """Device + dtype + seeding + torch.distributed from torchrun's environment, from the
    runtime flags (`overrides` replace single fields: compute_init(device="cpu", threads=1)).

    Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) the process group is created with NCCL on
    CUDA and gloo elsewhere, with a finite collective timeout (nanochat.distributed). Every rank
    gets the same seed: model init must agree across ranks; data differs by rank through the
    dataloader, not through the seed.
    """
    import torch
    import torch.distributed as dist

    flags = dataclasses.replace(flags or RuntimeFlags(), **overrides)
    device_type = autodetect_device_type(flags.device)
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
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) if ddp else 1  # this machine's share, not the job's
        set_cpu_threads(flags.threads if flags.threads > 0 else max(1, (os.cpu_count() or 1) // max(1, ranks_here)))
    if ddp and world_size > 1 and not dist.is_initialized():
        distributed.init_process_group("nccl" if device_type == "cuda" else "gloo", dev if device_type == "cuda" else None)
    seed_everything(flags.seed)
    dtype = resolve_dtype(device_type, flags.dtype)
    return RunContext(dev, device_type, dtype, ddp and world_size > 1, rank, local_rank, world_size)


def compute_cleanup() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# bf16 dense peak FLOP/s by GPU name (datasheets, without sparsity), for MFU
GPU_PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "5090": 209.5e12, "4090": 165.2e12, "l4": 121e12}
_measured_peaks: dict[tuple[str, str], float] = {}


def peak_flops(ctx: RunContext) -> float:
    """The MFU denominator of every training stage and bench, per device: the datasheet bf16 peak
    of a known GPU, else a measured dense matmul in the compute dtype (CPU, unknown GPUs), measured
    once per process."""
    import torch

    if ctx.device_type == "cuda":
        name = torch.cuda.get_device_name(ctx.device).lower()
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
    key = (ctx.device_type, str(ctx.dtype))
    if key not in _measured_peaks:
        _measured_peaks[key] = matmul_flops(ctx.device, ctx.dtype, size=4096 if ctx.device_type == "cuda" else 1024)
    return _measured_peaks[key]


def matmul_flops(device: "torch.device | str", dtype: "torch.dtype", seconds: float = 0.5, size: int = 1024) -> float:
    """Measured dense (size x size) @ (size x size) matmul FLOP/s on `device` in `dtype`."""
    import time

    import torch

    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    sync()
    return 2 * size**3 * n / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# experiment tracking

class DummyWandb:
    """Stands in for a wandb run when no run name is given (or it is 'dummy')."""

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass

    def finish(self) -> None:
        pass


def init_wandb(project: str, run_name: str, config: dict[str, Any], master: bool = True) -> Any:
    """A wandb run named `run_name` (the --run flag; WANDB_RUN when the flag is left at 'dummy') on
    the master process, else a no-op. Log with run.log({...}, step=step) so that train and eval
    points of one step line up."""
    if run_name == "dummy":
        run_name = os.environ.get("WANDB_RUN", "dummy")
    if run_name == "dummy" or not master:
        return DummyWandb()
    try:
        import wandb
    except ImportError:
        raise UserError(f"--run={run_name}: wandb is not installed (pip install -e '.[wandb]'), or use --run=dummy") from None
    return wandb.init(project=project, name=run_name, config=config)
