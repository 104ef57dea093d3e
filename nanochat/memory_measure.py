"""Training memory, measured: what the planner (nanochat/memory.py) is checked against.

- `saved_bytes`: the bytes autograd keeps for backward while a function runs (saved-tensor hooks);
  `measure_block_saved_bytes`: per token and fixed, of one block (or its MLP), at two lengths.
- `measure_allocated_peak`: the most tensor-storage bytes alive at once in a steady training step
  (AllocationTracker, the CPU analogue of torch.cuda.max_memory_allocated).
- `measure_peak`: torch.cuda.max_memory_allocated on CUDA; on CPU the resident-set high-water mark
  (VmHWM) of a fresh process whose glibc malloc returns freed blocks at once (MEASURE_ENV), reset
  after a warm-up step at the same shapes, minus its resident set before.
How close the plan comes to each: docs/memory.md.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from dataclasses import asdict, replace
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nanochat.common import RunContext
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import setup_optimizers
from nanochat.precision import prepare_parameters
from nanochat.trainer import train_step

# --dtype of the planner: the compute dtype (the weights' is --param_dtype)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# the fresh process that measure_peak runs on CPU: freed blocks of >= 64 KiB go back to the system at
# once (mmap), the heap is trimmed, one arena, one thread, and no tcmalloc (it keeps freed memory)
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1",
               "NANOCHAT_TCMALLOC": "0", "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------
# bytes saved for backward

def saved_bytes(run: Callable[[], Any], exclude: list[torch.Tensor]) -> tuple[int, list[tuple[int, ...]]]:
    """Bytes of the distinct storages autograd keeps while run() executes, and the saved shapes.

    Storages of `exclude` (parameters, buffers, inputs that exist anyway) are not counted; a storage
    saved by several ops (a norm's output that the next Linear keeps too) is counted once.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages, shapes = {}, []

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
            shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values()), shapes


class BlockSavedBytes(NamedTuple):
    per_token: float                 # bytes saved per token
    fixed: float                     # bytes saved whatever the length (bf16 weight copies)
    shapes: list[tuple[int, ...]]    # the saved tensors' shapes at the longer length


def measure_block_saved_bytes(config: GPTConfig, dtype: str, lengths: tuple[int, int] = (32, 96),
                              batch_size: int = 2, part: str = "block", param_dtype: str = "float32") -> BlockSavedBytes:
    """What one block of `config` (`param_dtype` weights, bf16 autocast or fp32) saves for backward, from
    the saved bytes at two sequence lengths; part="mlp": its MLP alone. With value_embeds the block
    carries one (the only block is the last), and its lookup runs inside the measurement."""
    if part not in ("block", "mlp"):
        raise ValueError(f"part: expected block or mlp, got {part!r}")
    torch.manual_seed(0)
    model = GPT(replace(config, n_layer=1, sequence_len=max(lengths)))
    prepare_parameters(model, param_dtype)
    block, d, stream = model.transformer.h[0], config.n_embd, model.stream_dtype("cpu")
    autocast = dtype == "bfloat16"
    sizes, shapes = [], []
    for length in lengths:
        x = torch.randn(batch_size, length, d, dtype=stream, requires_grad=True)  # the residual stream
        idx = torch.randint(0, config.vocab_size, (batch_size, length))
        cos, sin = model.cos[:length].to(DTYPES[dtype]), model.sin[:length].to(DTYPES[dtype])

        def run():
            if part == "mlp":
                return block.mlp(x)
            ve = model.value_embeds["0"](idx).to(stream) if model.value_embeds is not None else None
            return block(x, cos, sin, None, ve)

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            size, shapes = saved_bytes(run, [*model.parameters(), *model.buffers(), cos, sin, idx])
        sizes.append(size)
    per_token = (sizes[1] - sizes[0]) / (batch_size * (lengths[1] - lengths[0]))
    return BlockSavedBytes(per_token, sizes[0] - per_token * batch_size * lengths[0], shapes)


# ---------------------------------------------------------------------------------------------
# a real training step

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]  # (inputs, targets), each (batch_size, sequence_len)


def training_setup(config: GPTConfig, batch_size: int, dtype: str, device: str,
                   **precision: str) -> tuple[GPT, list[torch.optim.Optimizer], Batches, RunContext]:
    """A fresh model, base_train's optimizers (with the precision options of `precision`:
    param_dtype, grad_dtype, optim_state), a stream of random (inputs, targets) micro-batches and
    the RunContext: what a measured training step needs."""
    ctx = RunContext(torch.device(device), device, DTYPES[dtype], False, 0, 0, 1)
    with torch.device(device):
        model = GPT(config)
    optimizers = setup_optimizers(model, **precision)
    generator = torch.Generator().manual_seed(0)

    def batches():
        while True:
            tokens = torch.randint(0, config.vocab_size, (batch_size, config.sequence_len + 1), generator=generator)
            tokens = tokens.to(device)
            yield tokens[:, :-1], tokens[:, 1:]

    return model, optimizers, batches(), ctx


def run_training_steps(config: GPTConfig, batch_size: int, dtype: str, grad_accum_steps: int, steps: int,
                       device: str, **precision: str) -> GPT:
    """`steps` optimizer steps of base_train's kind on random tokens (the first creates the
    optimizer state, so steady state needs 2)."""
    model, optimizers, stream, ctx = training_setup(config, batch_size, dtype, device, **precision)
    for _ in range(steps):
        train_step(model, optimizers, stream, grad_accum_steps, ctx)
    return model


class AllocationTracker(TorchDispatchMode):
    """The most bytes of tensor storage alive at once while it is active: the storages of `alive`
    (tensors that exist already) and of every op's outputs until they are freed. The CPU analogue
    of torch.cuda.max_memory_allocated: allocated bytes, whether or not their pages are touched."""

    def __init__(self, alive: list[torch.Tensor]) -> None:
        super().__init__()
        self.live = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}
        self.current = sum(self.live.values())
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live and storage.nbytes() > 0:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)
        return out

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


def optimizer_held(optimizers: list[torch.optim.Optimizer]) -> list[torch.Tensor]:
    """The tensors optimizers keep between steps: their per-parameter state and, with 8-bit states,
    the tables of their quantization maps (precision.OptimizerStates, made at the first step)."""
    held = [v for opt in optimizers for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    for opt in optimizers:
        states = getattr(opt, "states", None)
        if states is not None:
            held += [*states._qmaps.values(), *(t for pair in states._code_tables.values() for t in pair)]
    return held


def measure_allocated_peak(config: GPTConfig, batch_size: int, dtype: str, grad_accum_steps: int = 2,
                           **precision: str) -> int:
    """Peak bytes of tensor storage of a steady training step (after one that creates the optimizer
    state), in this process, on CPU: model, optimizer state, gradients, activations, temporaries.
    precision: setup_optimizers' param_dtype, grad_dtype, optim_state."""
    model, optimizers, stream, ctx = training_setup(config, batch_size, dtype, "cpu", **precision)
    train_step(model, optimizers, stream, grad_accum_steps, ctx)
    with AllocationTracker([*model.parameters(), *model.buffers(), *optimizer_held(optimizers)]) as tracker:
        train_step(model, optimizers, stream, grad_accum_steps, ctx)
    return tracker.peak


# ---------------------------------------------------------------------------------------------
# what the operating system sees

def resident_bytes(field: str = "VmRSS") -> int:
    """This process's resident set (VmRSS) or its high-water mark (VmHWM), from /proc/self/status.

    Not getrusage's ru_maxrss: Linux keeps that across execve, so a process started from a large
    parent would report the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field} line")


def reset_high_water() -> None:
    """VmHWM := VmRSS now (Linux >= 4.0), so that earlier peaks (imports, warm-up) do not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_child(spec: str) -> None:
    """Runs in the fresh process that measure_peak starts; prints one JSON line."""
    args = json.loads(spec)
    config = GPTConfig(**args["config"])
    torch.set_num_threads(1)
    # one step first, at the same shapes, so that the baseline holds the code and the libraries'
    # caches for them (oneDNN's bf16 matmul primitives: ~7 MiB), which are not training state
    run_training_steps(config, args["batch_size"], args["dtype"], args["grad_accum_steps"], 1, "cpu", **args["precision"])
    gc.collect()
    baseline = resident_bytes()
    reset_high_water()
    run_training_steps(config, args["batch_size"], args["dtype"], args["grad_accum_steps"], args["steps"], "cpu",
                       **args["precision"])
    print(json.dumps({"peak_bytes": resident_bytes("VmHWM") - baseline, "baseline_bytes": baseline}))


def measure_peak(config: GPTConfig, batch_size: int, dtype: str, grad_accum_steps: int = 2, steps: int = 2,
                 device: str = "cpu", **precision: str) -> int:
    """Measured peak bytes of `steps` training steps, beyond what the process held before.
    precision: setup_optimizers' param_dtype, grad_dtype, optim_state."""
    if device == "cuda":
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_training_steps(config, batch_size, dtype, grad_accum_steps, steps, device, **precision)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - baseline
    if device != "cpu":
        raise ValueError(f"device: expected cpu or cuda, got {device!r}")
    spec = json.dumps({"config": asdict(config), "batch_size": batch_size, "dtype": dtype,
                       "grad_accum_steps": grad_accum_steps, "steps": steps, "precision": precision})
    env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    env.update(MEASURE_ENV)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    code = "import sys; from nanochat.memory_measure import measure_child; measure_child(sys.argv[1])"
    result = subprocess.run([sys.executable, "-c", code, spec], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"measuring process failed (status {result.returncode}): {result.stderr.strip()[-2000:]}")
    return int(json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"])
