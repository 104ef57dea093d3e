"""Device, dtype, distributed init, paths, logging, seeding, the error wrapper, the MFU
denominator and experiment tracking: once, for every script.

CPU threads: 0 = all cores, split among the ranks on this machine (`--threads` overrides).
"""

from __future__ import annotations

import dataclasses
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
    except Exception as e:
        line = expected_failure(e)
        if line is None:
            raise
        fail(line)
    finally:
        compute_cleanup()


OOM_ADVICE = ("see the plan with python -m nanochat.memory (the same --depth, --max_seq_len, --device_batch_size "
              "flags), then lower --device_batch_size (--total_batch_size is kept by gradient accumulation) or "
              "pick a --memory_mode (low, lowest)")


def expected_failure(e: Exception) -> str | None:
    """The one line for an expected failure that is not a UserError, else None: out of memory (CUDA,
    or the CPU allocator), or a torch.distributed error (a rendezvous that cannot connect, a NCCL
    error) that no collective wrapper turned into nanochat.distributed.PeerLost. A NCCL watchdog
    timeout aborts the process from a C++ thread and cannot be caught here."""
    torch = sys.modules.get("torch")  # not imported: no torch error is possible
    if torch is None:
        return None
    text = str(e).strip()
    cpu_oom = text.find("DefaultCPUAllocator: can't allocate memory")
    if isinstance(e, torch.OutOfMemoryError) or cpu_oom >= 0:
        # CUDA: "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ..."; CPU: "[enforce fail
        # at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried ..."
        cause = text[cpu_oom:].split(". ")[0] if cpu_oom >= 0 else ". ".join(text.split(". ")[:2]).splitlines()[0]
        return f"out of memory ({cause.rstrip('.') or type(e).__name__}): {OOM_ADVICE}"
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        cause = text.splitlines()[0] if text else ""
        return (f"the process group failed ({type(e).__name__}: {cause}): check that every rank runs the same "
                f"command and can reach --master_addr:--master_port, and whether a rank died")
    return None


# ---------------------------------------------------------------------------------------------
# torch: device, dtype, threads, seeding, distributed

def autodetect_device_type(override: str = "") -> str:
    """'cuda' if available, else 'mps', else 'cpu'; `override` (cuda|mps|cpu) wins. Falling back
    to the CPU on a machine with an NVIDIA driver (nvidia-smi) says so in one line: this torch
    cannot use that GPU, and --device=cuda would make it an error."""
    import shutil

    import torch

    if override:
        check_device(override)
        return override
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    if shutil.which("nvidia-smi"):
        print0(f"warning: an NVIDIA driver is installed (nvidia-smi) but torch {torch.__version__} "
               f"(CUDA build: {torch.version.cuda or 'none'}) cannot use a GPU: running on the CPU "
               f"(--device=cuda makes this an error)")
    return "cpu"


def resolve_dtype(device_type: str, override: str = "auto") -> "torch.dtype":
    """Compute dtype for matmuls: bf16 where the hardware computes it natively (CUDA capability
    8.0+, CPUs with AVX-512 BF16/AMX), float32 elsewhere (pre-Ampere GPUs such as T4, V100 and
    RTX 20xx, whose bf16 is emulated and which have no bf16 flash or memory-efficient attention;
    MPS; older CPUs). `override`: auto|float32|bfloat16."""
    import torch

    if override == "float32":
        return torch.float32
    if override == "bfloat16":
        return torch.bfloat16
    if override != "auto":
        raise ConfigError(f"--dtype: expected one of {'|'.join(DTYPES)}, got {override!r}")
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    if device_type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor(), else 'unknown CPU'."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


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
        # Read once, when CUDA initialises (set_device below): segments that grow in place instead of
        # fixed blocks, so the fragmentation the memory plan cannot count stays small. A user's
        # PYTORCH_CUDA_ALLOC_CONF wins, and so does PYTORCH_ALLOC_CONF (torch reads it first).
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
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


def device_summary(ctx: RunContext) -> str:
    """One line saying what computes, printed at the start of every training stage so that a log
    shows at once a run on the wrong device or the wrong build: the GPU's name, compute capability
    and memory, torch and CUDA versions; on CPU the CPU model and threads; the compute dtype."""
    import torch

    ranks = f", {ctx.world_size} ranks" if ctx.world_size > 1 else ""
    tail = f"torch {torch.__version__}, compute {str(ctx.dtype).replace('torch.', '')}{ranks}"
    if ctx.device_type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        return (f"device: {ctx.device} {props.name}, compute capability {props.major}.{props.minor}, "
                f"{props.total_memory / 2**30:.1f} GiB; CUDA {torch.version.cuda}, {tail}")
    if ctx.device_type == "mps":
        return f"device: mps (Apple GPU) on {cpu_model_name()}; {tail}"
    return f"device: cpu {cpu_model_name()}, {torch.get_num_threads()} threads; {tail}"


def cuda_build_runs_on(arch_list: list[str], capability: tuple[int, int]) -> bool:
    """Whether a torch build with these targets (torch.cuda.get_arch_list(): "sm_90", "compute_120",
    ...) has kernels for a GPU of this capability: a cubin for X.y runs on X.z for z >= y, and PTX
    for any capability up to the GPU's is compiled when loaded."""
    for arch in arch_list:
        kind, number = arch.split("_")
        built = (int(number[:-1]), int(number[-1]))
        if built <= capability and (kind == "compute" or built[0] == capability[0]):
            return True
    return False


def check_cuda_build(driver: str = "") -> None:
    """Exit with one line unless the installed torch sees the GPU and has kernels for it (setup_env.sh
    runs this right after installing torch on a machine with an NVIDIA driver)."""
    import torch

    from nanochat.config import cuda_unavailable_reason

    if not torch.cuda.is_available():
        sys.exit(f"error: {cuda_unavailable_reason()} (driver {driver or 'unknown'}); set TORCH_INDEX_URL")
    capability = torch.cuda.get_device_capability()
    if not cuda_build_runs_on(torch.cuda.get_arch_list(), capability):
        sys.exit(f"error: torch {torch.__version__} (CUDA {torch.version.cuda}) has no kernels for "
                 f"{torch.cuda.get_device_name()} (sm_{capability[0]}{capability[1]}): set TORCH_INDEX_URL "
                 f"to a build that has (https://pytorch.org/get-started/locally/)")


def compute_cleanup() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# Dense bf16 tensor-core peak FLOP/s per GPU, keyed by the exact torch.cuda.get_device_name(): the
# MFU denominator. Datasheet figures without 2:4 sparsity (NVIDIA's H100, H200, B200, A100, L4, L40
# and L40S datasheets; the GA102, AD102 and GB202 whitepapers for GeForce cards). The GeForce
# figures are those with FP32 accumulate, which bf16 matmuls use (the FP16-accumulate figures are
# twice these). Names not listed (laptop parts, whose clocks follow their power limit; cards not
# here; H100/H200 variants) get a measured matmul instead (peak_flops).
GPU_PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989.4e12,  # H100 SXM
    "NVIDIA H100 PCIe": 756.5e12,
    "NVIDIA H100 NVL": 835e12,  # per GPU of the pair
    "NVIDIA H200": 989.4e12,  # H200 SXM
    "NVIDIA B200": 2250e12,  # 4.5 PFLOP/s with sparsity
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L4": 121e12,
    "NVIDIA L40": 181e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA GeForce RTX 3090": 71e12,
    "NVIDIA GeForce RTX 4090": 165.2e12,
    "NVIDIA GeForce RTX 5090": 209.5e12,
}
_measured_peaks: dict[tuple[str, str], float] = {}


def peak_flops(ctx: RunContext) -> float:
    """The MFU denominator of every training stage and bench, per device: the datasheet peak of a
    GPU named in GPU_PEAK_FLOPS when computing in bf16; else (CPU, other GPUs, float32) a dense
    matmul in the compute dtype, measured once per process and announced in one line, since it is
    what this machine achieved at that moment, not a datasheet figure."""
    import torch

    name = torch.cuda.get_device_name(ctx.device) if ctx.device_type == "cuda" else cpu_model_name()
    if ctx.device_type == "cuda" and ctx.dtype == torch.bfloat16 and name in GPU_PEAK_FLOPS:
        return GPU_PEAK_FLOPS[name]
    key = (str(ctx.device), str(ctx.dtype))
    if key not in _measured_peaks:
        size = 4096 if ctx.device_type == "cuda" else 1024
        _measured_peaks[key] = matmul_flops(ctx.device, ctx.dtype, size=size)
        dtype = str(ctx.dtype).replace("torch.", "")
        print0(f"MFU: relative to a {size}x{size} {dtype} matmul measured now on {ctx.device} ({name}): "
               f"{_measured_peaks[key] / 1e12:.3g} TFLOP/s, not a datasheet peak")
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

