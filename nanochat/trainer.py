"""Training-loop pieces shared by base_train, mid_train, chat_sft and chat_rl.

Each script owns its loop (read it top to bottom); what they have in common lives here once:
the flags every stage takes (`TrainFlags`, including MoleGrad and recompute), building the model
from flags, one optimisation step with gradient accumulation and clipping, the LR schedule
application, progress/ETA/MFU reporting, and checkpoint save/resume of the whole training state.
"""

from __future__ import annotations

import functools
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from nanochat import distributed
from nanochat.checkpoint import CheckpointError, load_checkpoint, load_meta, load_model_state_strict, rng_state, save_checkpoint, set_rng_state
from nanochat.common import RunContext
from nanochat.config import RuntimeFlags, UserError, check
from nanochat.distributed import AVG, all_reduce, wait_all
from nanochat.gpt import RECOMPUTE_MODES
from nanochat.optim import apply_lr, get_lr_multiplier, get_muon_momentum, update_subspaces
from nanochat.streaming_linear import STREAMING_MOMENTA, STREAMING_TARGETS, streaming_layers, zero_factor_grad


@dataclass
class TrainFlags(RuntimeFlags):
    """Flags shared by every training stage (with the runtime flags)."""

    run: str = field(default="dummy", metadata={"help": "wandb run name (dummy = no wandb; WANDB_RUN also works)"})
    device_batch_size: int = field(default=32, metadata={"help": "sequences per forward/backward on one device"})
    embedding_lr: float = field(default=0.2, metadata={"help": "AdamW LR for the token embedding"})
    unembedding_lr: float = field(default=0.004, metadata={"help": "AdamW LR for the LM head"})
    matrix_lr: float = field(default=0.02, metadata={"help": "Muon LR for the transformer matrices"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0 = no clipping)"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of steps with linear LR warmup"})
    warmdown_ratio: float = field(default=0.2, metadata={"help": "fraction of steps with linear LR warmdown"})
    final_lr_frac: float = field(default=0.0, metadata={"help": "LR at the end, as a fraction of the initial LR"})
    save_every: int = field(default=-1, metadata={"help": "checkpoint every N steps (-1 = only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many complete checkpoints to keep (0 = all)"})
    resume_from_step: int = field(default=-1, metadata={"help": "resume the run from this saved step (-1 = fresh start)"})
    model_tag: str = field(default="", metadata={"short": "-c", "help": "checkpoint directory to write (default: d<depth>, or the source's)"})
    recompute: str = field(default="none", metadata={"help": "exact activation recompute", "choices": RECOMPUTE_MODES})
    enable_streaming: bool = field(default=False, metadata={"help": "MoleGrad: low-rank weight gradients"})
    streaming_rank_k: int = field(default=32, metadata={"help": "MoleGrad rank k (1 <= k <= layer input width)"})
    streaming_power_iters: int = field(default=1, metadata={"help": "MoleGrad power-iteration steps per update (>= 1)"})
    streaming_target_layers: str = field(default="ffn_only", metadata={"help": "MoleGrad targets", "choices": STREAMING_TARGETS})
    streaming_warm_start_decay: float = field(default=0.95, metadata={"help": "MoleGrad sketch EMA decay in [0, 1)"})
    streaming_momentum: str = field(default="dense", metadata={
        "help": "Muon momentum of MoleGrad matrices: dense (out x in, fed by the factors) or lowrank "
                "(out x k factors, moved with the subspace)", "choices": STREAMING_MOMENTA})

    def validate(self) -> None:
        super().validate()
        check(self.device_batch_size >= 1, f"--device_batch_size: expected >= 1, got {self.device_batch_size}")
        check(self.streaming_rank_k >= 1, f"--streaming_rank_k: expected >= 1, got {self.streaming_rank_k}")
        check(self.streaming_power_iters >= 1, f"--streaming_power_iters: expected >= 1, got {self.streaming_power_iters}")
        check(0.0 <= self.streaming_warm_start_decay < 1.0,
              f"--streaming_warm_start_decay: expected a value in [0, 1), got {self.streaming_warm_start_decay}")
        check(0.0 <= self.warmup_ratio + self.warmdown_ratio <= 1.0,
              f"--warmup_ratio + --warmdown_ratio: expected a sum in [0, 1], got {self.warmup_ratio + self.warmdown_ratio}")
        check(self.grad_clip >= 0, f"--grad_clip: expected >= 0, got {self.grad_clip}")
        check(self.resume_from_step >= -1, f"--resume_from_step: expected a step >= 0 (or -1), got {self.resume_from_step}")

    def memory_options(self) -> dict[str, Any]:
        """The GPTConfig fields these flags set."""
        return {
            "recompute": self.recompute,
            "streaming_rank_k": self.streaming_rank_k if self.enable_streaming else 0,
            "streaming_targets": self.streaming_target_layers,
            "streaming_power_iters": self.streaming_power_iters,
            "streaming_warm_start_decay": self.streaming_warm_start_decay,
            "streaming_momentum": self.streaming_momentum,
        }


def grad_accum_steps(total_batch_size: int, device_batch_size: int, seq_len: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that every step sees `total_batch_size` tokens."""
    per_pass = device_batch_size * seq_len * world_size
    check(total_batch_size > 0 and total_batch_size % per_pass == 0,
          f"--total_batch_size: expected a positive multiple of device_batch_size*max_seq_len*world_size "
          f"= {device_batch_size}*{seq_len}*{world_size} = {per_pass}, got {total_batch_size}")
    return total_batch_size // per_pass


def all_optimizer_params(optimizers: list[torch.optim.Optimizer]) -> list[torch.Tensor]:
    return [p for opt in optimizers for group in opt.param_groups for p in group["params"]]


def gradient_tensors(optimizers: list[torch.optim.Optimizer]) -> list[torch.Tensor]:
    """This step's gradients: p.grad of dense parameters, and for a MoleGrad weight (in a Muon's
    `streaming`) its layer's grad_factor (out, k), the only gradient it has: dW = grad_factor Qᵀ,
    and ‖dW‖ = ‖grad_factor‖ since Q has orthonormal columns."""
    streaming = {key: layer for opt in optimizers for key, layer in getattr(opt, "streaming", {}).items()}
    grads = []
    for p in all_optimizer_params(optimizers):
        layer = streaming.get(id(p))
        grad = p.grad if layer is None else layer.grad_factor
        if grad is not None:
            grads.append(grad)
    return grads


def sharded(opt: torch.optim.Optimizer) -> bool:
    """A distributed optimizer (optim.ShardedStep) that reduces its own gradients."""
    return getattr(opt, "sharded", False)


def clip_grad_norm(optimizers: list[torch.optim.Optimizer], max_norm: float) -> float:
    """Global gradient norm over every parameter (MoleGrad factors included); scale gradients
    down to `max_norm` if above.

    With sharded optimizers, after their reduce_gradients(): each rank holds the averaged gradient
    of the parameters it owns (`gradient_shards`) and the replicated ones (everything else in
    `gradient_tensors`), so the norm is √(all-reduced Σ‖shard‖² + Σ‖replicated‖²)."""
    grads = gradient_tensors(optimizers)
    shards = {id(g) for opt in optimizers if sharded(opt) for g in opt.gradient_shards()}
    distributed_norm = any(sharded(opt) for opt in optimizers)
    if not grads and not distributed_norm:
        return 0.0
    acc_dtype = functools.reduce(torch.promote_types, (g.dtype for g in grads), torch.float32)  # fp32, or fp64 models
    norms = [torch.linalg.vector_norm(g, dtype=acc_dtype) for g in grads]
    if distributed_norm:
        device = grads[0].device if grads else all_optimizer_params(optimizers)[0].device
        shard_sq = torch.zeros((), dtype=acc_dtype, device=device)
        replicated_sq = torch.zeros((), dtype=acc_dtype, device=device)
        for g, norm in zip(grads, norms):
            (shard_sq if id(g) in shards else replicated_sq).add_(norm.square())
        distributed.all_reduce(shard_sq, "scalar").wait()
        total = (shard_sq + replicated_sq).sqrt()
    else:
        total = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype))
    return float(total)


def train_step(
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    grad_accum: int,
    ctx: RunContext,
    lr_multiplier: float,
    muon_momentum: float | None,
    grad_clip: float,
) -> tuple[float, float]:
    """One optimizer step over `grad_accum` micro-batches. Returns (mean loss, grad norm).

    The loss of each micro-batch is divided by grad_accum so the gradients equal those of one
    big batch (MoleGrad factors add up the same way: every micro-batch of a step uses the same Q).
    Under DDP, `reduce_across_ranks` averages the gradients. Then clipping, the optimizer steps
    (sharded ones broadcast what they updated), and the MoleGrad subspaces move
    (update_subspaces: after the step, so that backward and optimizer saw the same Q).
    """
    losses = []
    for _, (inputs, targets) in zip(range(grad_accum), micro_batches):
        with ctx.autocast():
            loss = model(inputs, targets)
        (loss / grad_accum).backward()
        losses.append(loss.detach())
    mean_loss = torch.stack(losses).mean()
    if ctx.ddp:
        reduce_across_ranks(model, optimizers, mean_loss)
    norm = clip_grad_norm(optimizers, grad_clip) if grad_clip > 0 else 0.0
    apply_lr(optimizers, lr_multiplier)
    for opt in optimizers:
        if muon_momentum is not None and "momentum" in opt.defaults:
            for group in opt.param_groups:
                group["momentum"] = muon_momentum
        opt.step()
    update_subspaces(model, optimizers)
    model.zero_grad(set_to_none=True)
    zero_factor_grad(model)  # `model` may be a torch.compile wrapper, whose zero_grad is nn.Module's
    return float(mean_loss), norm


def reduce_across_ranks(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], mean_loss: torch.Tensor) -> None:
    """Averages this step's gradients and loss across processes, in place.

    Sharded optimizers reduce their own (each dense gradient onto its owner rank; MoleGrad factors
    (out, k) all-reduced); any other optimizer's gradients are all-reduced whole. The MoleGrad
    subspace statistics (sketch (in, k+e), energy, tokens) are summed, so that every rank moves
    its Q identically, following every rank's tokens. The weights of MoleGrad layers never cross.
    """
    pending = [all_reduce(statistic, "molegrad statistics")
               for layer in streaming_layers(model) for statistic in layer.step_statistics()]
    pending.append(all_reduce(mean_loss, "scalar", op=AVG))
    for opt in optimizers:
        if sharded(opt):
            opt.reduce_gradients()
        else:
            pending += [all_reduce(grad, "replicated gradient", op=AVG) for grad in gradient_tensors([opt])]
    wait_all(pending)


def schedule(step: int, num_iterations: int, flags: TrainFlags) -> tuple[float, float]:
    """(LR multiplier, Muon momentum) at `step`."""
    lrm = get_lr_multiplier(step, num_iterations, flags.warmup_ratio, flags.warmdown_ratio, flags.final_lr_frac)
    return lrm, get_muon_momentum(step)


class NonFiniteLoss(UserError, RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


def check_finite(loss: float, step: int, checkpoint_dir: Path) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLoss(
            f"loss became {loss} at step {step}; stopping without saving. The last good checkpoint in "
            f"{checkpoint_dir} is untouched: resume from it with a lower --matrix_lr/--embedding_lr"
        )


# ---------------------------------------------------------------------------------------------
# progress

class Progress:
    """Tokens/s, MFU and ETA from the mean of the last few step times (the first step, which
    pays for warm-up and compilation, is left out)."""

    def __init__(self, total_steps: int, tokens_per_step: int, flops_per_token: float, peak_flops: float, start_step: int = 0):
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.start_step = start_step
        self.recent: deque[float] = deque(maxlen=10)
        self.total_time = 0.0  # summed over the steps counted in `recent`
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self, step: int) -> dict[str, float]:
        dt = time.perf_counter() - self._t0
        if step > self.start_step:
            self.total_time += dt
            self.recent.append(dt)
        ref = sum(self.recent) / len(self.recent) if self.recent else dt
        tok_per_s = self.tokens_per_step / ref
        mfu = 100.0 * tok_per_s * self.flops_per_token / self.peak_flops if self.peak_flops > 0 else float("nan")
        eta = (self.total_steps - step - 1) * ref
        return {"dt": dt, "tok_per_s": tok_per_s, "mfu": mfu, "eta_s": eta}


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ---------------------------------------------------------------------------------------------
# checkpoint save / resume of the whole training state

def save_training_state(
    directory: Path,
    step: int,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    loader_state: dict[str, Any],
    meta: dict[str, Any],
    ctx: RunContext,
    keep_last: int,
    extra_state: dict[str, Any] | None = None,
) -> None:
    rank_state = {
        "optimizers": [opt.state_dict() for opt in optimizers],
        "loader": loader_state,
        "rng": rng_state(),
        **(extra_state or {}),
    }
    model_state = model.state_dict() if ctx.master else None
    save_checkpoint(directory, step, model_state, rank_state, None, rank=ctx.rank, keep_last=0)
    if ctx.ddp:
        distributed.barrier("checkpoint save")  # every rank's state is on disk before the meta file marks it complete
    if ctx.master:
        save_checkpoint(directory, step, None, rank_state, {**meta, "world_size": ctx.world_size}, rank=ctx.rank, keep_last=keep_last)
    if ctx.ddp:
        distributed.barrier("checkpoint save")


def resume_training_state(
    directory: Path, step: int, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], ctx: RunContext
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load model, optimizers and RNG saved at `step`; returns (rank_state, meta).

    Optimizer state is per rank (sharded optimizers keep only what their rank owns), so a run
    resumes only on the world size it was saved with; another one is a one-line CheckpointError."""
    saved_world_size = load_meta(directory, step).get("world_size", 1)
    if saved_world_size != ctx.world_size:
        raise CheckpointError(
            f"checkpoint at step {step} in {directory} was saved with world size {saved_world_size}, "
            f"this run has world size {ctx.world_size}: resume with the same number of processes"
        )
    model_state, rank_state, meta = load_checkpoint(directory, step, rank=ctx.rank)
    load_model_state_strict(model, model_state, f"{directory} step {step}")
    assert rank_state is not None
    for opt, state in zip(optimizers, rank_state["optimizers"]):
        opt.load_state_dict(state)
    set_rng_state(rank_state["rng"])
    return rank_state, meta
