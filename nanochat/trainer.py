"""Training-loop pieces shared by base_train, mid_train, chat_sft and chat_rl.

Each script owns its loop (read it top to bottom); what they have in common lives here once:
the flags every stage takes (`TrainFlags`, including MoleGrad and recompute), building the model
from flags, one optimisation step with gradient accumulation and clipping, the LR schedule
application, progress/ETA/MFU reporting, checkpoint save/resume of the whole training state, and
`Guard`, which stops a run whose loss, gradients or weights went non-finite or whose loss
diverged, before anything bad is saved.

A resumed run trains with the LRs, schedule and options of its command line (the optimizer
state keeps its moments, not its old hyperparameters); what cannot change on resume (the shapes of
weights and optimizer state, the world size) is refused in one line.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from nanochat import distributed
from nanochat.checkpoint import (
    CheckpointError,
    healthy_steps,
    load_checkpoint,
    load_meta,
    load_model_state_strict,
    remove_stale_temp_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_meta,
)
from nanochat.common import RunContext, print0
from nanochat.config import RuntimeFlags, UserError, check, to_dict
from nanochat.distributed import AVG, all_reduce, wait_all
from nanochat.gpt import BLOCK_LINEARS, GPT, RECIPE_PIECES, GPTConfig, config_from_dict
from nanochat.model_flags import MemoryFlags, flag_errors
from nanochat.molegrad import MoleGradStep
from nanochat.optim import (
    ORTHOGONALIZERS,
    WEIGHT_DECAY_REF_WIDTH,
    apply_lr,
    check_recipe_options,
    get_lr_multiplier,
    get_muon_momentum,
)
from nanochat.precision import drop_gradients, gradient


@dataclass
class TrainFlags(MemoryFlags, RuntimeFlags):
    """Flags shared by every training stage (with the runtime and memory flags)."""

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
    keep_checkpoints: int = field(default=2, metadata={
        "help": "how many of the newest complete checkpoints to keep, besides the newest healthy one (0 = all)"})
    divergence_patience: int = field(default=100, metadata={
        "help": "stop after this many steps in a row with the loss above --divergence_factor x its best so far, "
                "or at ln(vocab) (a uniform guess) (0 = never)"})
    divergence_factor: float = field(default=3.0, metadata={"help": "a loss above this times its best so far has diverged (> 1)"})
    resume_from_step: int = field(default=-1, metadata={"help": "resume the run from this saved step (-1 = fresh start)"})
    model_tag: str = field(default="", metadata={"short": "-c", "help": "checkpoint directory to write (default: d<depth>, or the source's)"})
    scalar_lr: float = field(default=0.5, metadata={
        "help": "AdamW LR of the x0 lambdas (resid lambdas: /100), with --layer_lambdas"})
    muon_orthogonalizer: str = field(default="newton_schulz", metadata={
        "help": "Muon's orthogonalisation: newton_schulz (fixed quintic) or polar_express (per-step coefficients)",
        "choices": ORTHOGONALIZERS})
    normuon: bool = field(default=False, metadata={"help": "Muon: NorMuon per-row/column variance reduction"})
    normuon_beta2: float = field(default=0.9, metadata={"help": "NorMuon variance EMA decay in [0, 1)"})
    cautious_weight_decay: bool = field(default=False, metadata={
        "help": "Muon: decay only the weights whose update points toward zero"})
    weight_decay_by_width: bool = field(default=False, metadata={
        "help": f"Muon: --weight_decay x ({WEIGHT_DECAY_REF_WIDTH} / model width)^2"})

    def validate(self) -> None:
        super().validate()
        check(self.device_batch_size >= 1, f"--device_batch_size: expected >= 1, got {self.device_batch_size}")
        check(0.0 <= self.warmup_ratio + self.warmdown_ratio <= 1.0,
              f"--warmup_ratio + --warmdown_ratio: expected a sum in [0, 1], got {self.warmup_ratio + self.warmdown_ratio}")
        check(self.grad_clip >= 0, f"--grad_clip: expected >= 0, got {self.grad_clip}")
        check(self.resume_from_step >= -1, f"--resume_from_step: expected a step >= 0 (or -1), got {self.resume_from_step}")
        for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay", "final_lr_frac", "scalar_lr"):
            check(getattr(self, name) >= 0, f"--{name}: expected a number >= 0, got {getattr(self, name)}")
        check(self.save_every >= -1, f"--save_every: expected a step count >= 1 (or -1 = only at the end), got {self.save_every}")
        check(self.keep_checkpoints >= 0, f"--keep_checkpoints: expected >= 0 (0 = all), got {self.keep_checkpoints}")
        check(self.divergence_patience >= 0, f"--divergence_patience: expected >= 0 (0 = never), got {self.divergence_patience}")
        check(self.divergence_factor > 1, f"--divergence_factor: expected a number > 1, got {self.divergence_factor}")
        with flag_errors(self):
            check_recipe_options(**self._muon_options(), ns_steps=1, molegrad_momentum=self.memory_options()["molegrad_momentum"])

    def _muon_options(self) -> dict[str, Any]:
        return dict(orthogonalizer=self.muon_orthogonalizer, normuon=self.normuon, normuon_beta2=self.normuon_beta2,
                    cautious_weight_decay=self.cautious_weight_decay)

    def optimizer_options(self) -> dict[str, Any]:
        """setup_optimizers' recipe and precision options from these flags (the stochastic rounding's
        random bits from --seed)."""
        return dict(scalar_lr=self.scalar_lr, weight_decay_by_width=self.weight_decay_by_width, **self._muon_options(),
                    **self.precision_options(), seed=self.seed)


# --total_batch_size=-1 (auto): upstream nanochat's rule. B_REF tokens per step were measured optimal
# for its depth-12 model; the optimal batch grows as the token budget D^0.383 (Power Lines, arXiv
# 2505.13738), and at a fixed tokens:params ratio D ∝ the scaling parameters (block matrices + LM head).
AUTO_BATCH_REF_TOKENS = 2 ** 19
AUTO_BATCH_REF_DEPTH = 12
AUTO_BATCH_EXPONENT = 0.383


def scaling_params(config: GPTConfig) -> int:
    """The parameters the auto batch size scales with: the six Linears of every block and the LM
    head (embeddings, value embeddings and the recipe pieces' small gates and scalars left out),
    counted on the model itself, built on the meta device (no memory, no values)."""
    with torch.device("meta"):
        model = GPT(config)
    blocks = sum(block.get_submodule(name).weight.numel() for block in model.transformer.h for name in BLOCK_LINEARS)
    return blocks + model.lm_head.weight.numel()


def auto_total_batch_size(config: GPTConfig, ref_config: GPTConfig, tokens_per_pass: int) -> int:
    """Tokens per optimizer step for --total_batch_size=-1: B_REF (scaling_params(config) /
    scaling_params(ref_config))^0.383 rounded to the nearest power of two, then up to a whole
    number of passes (tokens_per_pass = device_batch_size x max_seq_len x world size). ref_config is
    the depth-12 model of the same vocabulary and context (base_train builds it)."""
    predicted = AUTO_BATCH_REF_TOKENS * (scaling_params(config) / scaling_params(ref_config)) ** AUTO_BATCH_EXPONENT
    power_of_two = 2 ** round(math.log2(predicted))
    return max(1, math.ceil(power_of_two / tokens_per_pass)) * tokens_per_pass


def grad_accum_steps(total_batch_size: int, device_batch_size: int, seq_len: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that every step sees `total_batch_size` tokens."""
    per_pass = device_batch_size * seq_len * world_size
    check(total_batch_size > 0 and total_batch_size % per_pass == 0,
          f"--total_batch_size: expected a positive multiple of device_batch_size*max_seq_len*world_size "
          f"= {device_batch_size}*{seq_len}*{world_size} = {per_pass}, got {total_batch_size}")
    return total_batch_size // per_pass


def all_optimizer_params(optimizers: list[torch.optim.Optimizer]) -> list[torch.Tensor]:
    return [p for opt in optimizers for group in opt.param_groups for p in group["params"]]


def gradient_tensors(optimizers: list[torch.optim.Optimizer], factors: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    """This step's gradients: those of dense parameters (precision.gradient: p.grad, or its fp32
    accumulation buffer), and for a MoleGrad weight its factor gradient (out, k) from `factors`
    (MoleGradStep.gradients()), the only gradient it has."""
    grads = []
    for p in all_optimizer_params(optimizers):
        grad = factors.get(id(p), gradient(p))
        if grad is not None:
            grads.append(grad)
    return grads


def sharded(opt: torch.optim.Optimizer) -> bool:
    """A distributed optimizer (optim.ShardedStep) that reduces its own gradients."""
    return getattr(opt, "sharded", False)


def clip_grad_norm(optimizers: list[torch.optim.Optimizer], factors: dict[int, torch.Tensor], max_norm: float) -> float:
    """Global gradient norm over every parameter (MoleGrad factors included); scale gradients
    down to `max_norm` if above.

    With sharded optimizers, after their reduce_gradients(): each rank holds the averaged gradient
    of the parameters it owns (`gradient_shards`) and the replicated ones (everything else in
    `gradient_tensors`), so the norm is √(all-reduced Σ‖shard‖² + Σ‖replicated‖²)."""
    grads = gradient_tensors(optimizers, factors)
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
    lr_multiplier: float = 1.0,
    muon_momentum: float | None = 0.95,
    grad_clip: float = 1.0,
) -> tuple[float, float]:
    """One optimizer step over `grad_accum` micro-batches. Returns (mean loss, grad norm).

    The loss of each micro-batch is divided by grad_accum so the gradients equal those of one
    big batch (MoleGrad factors add up the same way: every micro-batch of a step uses the same Q;
    with --grad_dtype=float32 under bf16 weights they add up in fp32 buffers, precision.gradient).
    Under DDP, `reduce_across_ranks` averages the gradients. Then clipping, the optimizer steps
    (sharded ones broadcast what they updated), and MoleGrad moves its subspaces (after the step,
    so that backward and optimizer saw the same Q). muon_momentum None: the optimizers' own.
    """
    molegrad = MoleGradStep(model)
    losses = []
    for _, (inputs, targets) in zip(range(grad_accum), micro_batches):
        with ctx.autocast():
            loss = model(inputs, targets)
        (loss / grad_accum).backward()
        losses.append(loss.detach())
    mean_loss = torch.stack(losses).mean()
    factors = molegrad.gradients()
    if ctx.ddp:
        reduce_across_ranks(optimizers, molegrad.statistics(), factors, mean_loss)
    norm = clip_grad_norm(optimizers, factors, grad_clip) if grad_clip > 0 else 0.0
    apply_lr(optimizers, lr_multiplier)
    for opt in optimizers:
        if muon_momentum is not None and "momentum" in opt.defaults:
            for group in opt.param_groups:
                group["momentum"] = muon_momentum
        opt.step()
    molegrad.finish(optimizers)
    drop_gradients(model.parameters())
    return float(mean_loss), norm


def reduce_across_ranks(optimizers: list[torch.optim.Optimizer], statistics: list[torch.Tensor],
                        factors: dict[int, torch.Tensor], mean_loss: torch.Tensor) -> None:
    """Averages this step's gradients and loss across processes, in place.

    Sharded optimizers reduce their own (each dense gradient onto its owner rank; MoleGrad factors
    (out, k) all-reduced); any other optimizer's gradients are all-reduced whole. MoleGrad's subspace
    `statistics` (sketch (in, k+e), energy, tokens) are summed, so that every rank moves its Q
    identically, following every rank's tokens. The weights of MoleGrad layers never cross.
    """
    pending = [all_reduce(statistic, "molegrad statistics") for statistic in statistics]
    pending.append(all_reduce(mean_loss, "scalar", op=AVG))
    for opt in optimizers:
        if sharded(opt):
            opt.reduce_gradients()
        else:
            pending += [all_reduce(grad, "replicated gradient", op=AVG) for grad in gradient_tensors([opt], factors)]
    wait_all(pending)


def schedule(step: int, num_iterations: int, flags: TrainFlags) -> tuple[float, float]:
    """(LR multiplier, Muon momentum) at `step`."""
    lrm = get_lr_multiplier(step, num_iterations, flags.warmup_ratio, flags.warmdown_ratio, flags.final_lr_frac)
    return lrm, get_muon_momentum(step)


# ---------------------------------------------------------------------------------------------
# guards

class RunDiverged(UserError, RuntimeError):
    """The run stopped itself (a non-finite loss, gradient or weight, or a diverged loss); the
    message names the step and the last healthy checkpoint."""


STUCK_TOLERANCE = 0.01  # a loss within 1% of ln(vocab) is that of a uniform guess


def first_non_finite(model: torch.nn.Module) -> str | None:
    """The name of the first floating parameter or buffer holding a NaN or an infinity, else None.
    One fused norm over all of them and one device sync (a NaN or an infinity makes its norm, and
    the sum, non-finite); the per-tensor search runs only when something is wrong."""
    tensors = [(name, t) for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_floating_point()]
    if not tensors:
        return None
    norms = torch._foreach_norm([t.detach() for _, t in tensors])
    if bool(torch.stack([norm.float().to(norms[0].device) for norm in norms]).sum().isfinite()):
        return None
    return next((name for name, t in tensors if not bool(torch.isfinite(t).all())), None)  # None: a finite norm overflowed


class Guard:
    """Checked after every optimizer step, so that nothing non-finite is ever saved: stops the run
    (RunDiverged, one line) when the loss, the gradient norm or a weight is not finite, and when
    the loss has diverged for --divergence_patience steps in a row: above --divergence_factor x its
    best so far, or within 1% of ln(vocab), the loss of a uniform guess.

    It also records each checkpoint's health. The loss of the step right after a save (or a
    resume) is the loss of that checkpoint's weights; rank 0 writes it into the checkpoint's meta
    ("loss", "healthy"), which pruning and the "last healthy checkpoint" of the message go by.
    vocab_size=None (a loss that is not a cross-entropy, chat_rl): finiteness only.
    """

    def __init__(self, flags: TrainFlags, directory: Path, ctx: RunContext, vocab_size: int | None,
                 resumed_step: int | None = None) -> None:
        self.directory, self.ctx = Path(directory), ctx
        self.cross_entropy = vocab_size is not None
        self.patience = flags.divergence_patience if self.cross_entropy else 0
        self.factor = flags.divergence_factor
        self.uniform_loss = math.log(vocab_size) if vocab_size else math.nan
        self.best = math.inf
        self.far_steps = self.stuck_steps = 0
        self.unmeasured = resumed_step  # the checkpoint whose weights the next step's loss measures

    def saved(self, step: int) -> None:
        self.unmeasured = step

    def check(self, step: int, loss: float, grad_norm: float, model: torch.nn.Module) -> None:
        """After train_step `step` (0-based; logged and saved as step + 1)."""
        finite = math.isfinite(loss)
        far = stuck = False
        if finite and self.cross_entropy:
            self.best = min(self.best, loss)
            far = loss > self.factor * self.best
            stuck = abs(loss - self.uniform_loss) < STUCK_TOLERANCE * self.uniform_loss
        self.far_steps = self.far_steps + 1 if far else 0
        self.stuck_steps = self.stuck_steps + 1 if stuck else 0
        if self.unmeasured == step:
            self._record(step, loss if finite else None, finite and not (far or stuck))
            self.unmeasured = None
        n = step + 1
        if not finite:
            self._stop(f"loss became {loss} at step {n}: stopping before anything non-finite is saved")
        if not math.isfinite(grad_norm):
            self._stop(f"gradient norm became {grad_norm} at step {n} (loss {loss:.4f}): stopping without saving")
        bad = first_non_finite(model)
        if bad is not None:
            self._stop(f"{bad} became non-finite in the update of step {n} (loss {loss:.4f}, grad norm {grad_norm:.3g}): "
                       f"stopping without saving it")
        if self.patience and self.far_steps >= self.patience:
            self._stop(f"the loss diverged: {self.far_steps} steps in a row above --divergence_factor={self.factor:g} x its "
                       f"best {self.best:.4f} (step {n}: {loss:.4f}; --divergence_patience={self.patience})")
        if self.patience and self.stuck_steps >= self.patience:
            self._stop(f"the loss diverged: {self.stuck_steps} steps in a row at ln(vocab) = {self.uniform_loss:.4f}, a "
                       f"uniform guess (step {n}: {loss:.4f}; --divergence_patience={self.patience})")

    def _record(self, step: int, loss: float | None, healthy: bool) -> None:
        if not self.ctx.master:
            return
        try:
            meta = load_meta(self.directory, step)
        except CheckpointError:
            return  # deleted under us: nothing to record
        write_meta(self.directory, step, {**meta, "loss": loss, "healthy": healthy})

    def _stop(self, what: str) -> None:
        steps = healthy_steps(self.directory)
        lrs = "--matrix_lr/--embedding_lr/--unembedding_lr"
        if steps:
            loss = load_meta(self.directory, steps[-1]).get("loss")
            advice = (f"the last healthy checkpoint is {self.directory} step {steps[-1]} (loss {loss:.4f}): resume from it "
                      f"with --resume_from_step={steps[-1]} and a lower {lrs}")
        else:
            advice = f"no healthy checkpoint in {self.directory}: start again with a lower {lrs}"
        raise RunDiverged(f"{what}; {advice}")


# ---------------------------------------------------------------------------------------------
# progress

class Progress:
    """Tokens/s, MFU and ETA from the mean of the last few step times (the first step, which
    pays for warm-up and compilation, is left out).

    MFU never reads above 100%: a model-FLOP rate above `peak_flops` (a peak measured at start-up
    while the machine was busy, common.peak_flops on CPU) raises the peak to that rate, said once,
    and MFU is from then on relative to the best rate observed."""

    def __init__(self, total_steps: int, tokens_per_step: int, flops_per_token: float, peak_flops: float, start_step: int = 0):
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.start_step = start_step
        self.recent: deque[float] = deque(maxlen=10)
        self.total_time = 0.0  # summed over the steps counted in `recent`
        self._t0 = 0.0
        self.peak_raised = False

    def mfu(self, tok_per_s: float) -> float:
        """Model FLOP utilisation in percent at `tok_per_s` (all ranks), at most 100."""
        rate = tok_per_s * self.flops_per_token
        if rate > self.peak_flops:
            if not self.peak_raised:
                print0(f"MFU: the model ran at {rate / 1e12:.3g} TFLOP/s, above the {self.peak_flops / 1e12:.3g} "
                       f"TFLOP/s peak (measured at a busy moment?): from now on MFU is relative to the best rate observed")
            self.peak_flops, self.peak_raised = rate, True
        return 100.0 * rate / self.peak_flops

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self, step: int) -> dict[str, float]:
        dt = time.perf_counter() - self._t0
        if step > self.start_step:
            self.total_time += dt
            self.recent.append(dt)
        ref = sum(self.recent) / len(self.recent) if self.recent else dt
        tok_per_s = self.tokens_per_step / ref
        eta = (self.total_steps - step - 1) * ref
        return {"dt": dt, "tok_per_s": tok_per_s, "mfu": self.mfu(tok_per_s), "eta_s": eta}


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
    guard: Guard | None = None,
) -> None:
    """One checkpoint of the whole training state (every rank calls this), then the guard learns
    which step it holds (its loss is recorded once the next step has measured it)."""
    rank_state = {
        "optimizers": [opt.state_dict() for opt in optimizers],
        "loader": loader_state,
        "rng": rng_state(),
    }
    model_state = model.state_dict() if ctx.master else None
    save_checkpoint(directory, step, model_state, rank_state, None, rank=ctx.rank, keep_last=0)
    if ctx.ddp:
        distributed.barrier("checkpoint save")  # every rank's state is on disk before the meta file marks it complete
    if ctx.master:
        meta = {**meta, "world_size": ctx.world_size, "device_type": ctx.device_type}  # what trained it, for the identity data
        save_checkpoint(directory, step, None, None, meta, rank=ctx.rank, keep_last=keep_last)
    if ctx.ddp:
        distributed.barrier("checkpoint save")
    if guard is not None:
        guard.saved(step)
    print0(f"saved checkpoint {directory} step {step}")


# GPTConfig fields that fix the shapes of weights and optimizer state, and the flags that set them
SHAPE_FIELDS = {"vocab_size": "the tokenizer's vocabulary", "n_layer": "--depth", "n_embd": "--depth", "n_head": "--depth",
                "n_kv_head": "--depth", "molegrad_rank_k": "--molegrad/--molegrad_rank_k/--memory_mode",
                "molegrad_targets": "--molegrad_targets/--memory_mode",
                "molegrad_momentum": "--molegrad_momentum/--memory_mode",
                "molegrad_subspace": "--molegrad_subspace",
                **{name: f"--{name}" for name in RECIPE_PIECES}}


def check_resumable(meta: dict[str, Any], config: GPTConfig, directory: Path, step: int) -> None:
    """CheckpointError naming the flag when this run's model differs from the checkpoint's in a
    shape of its weights or optimizer state (MoleGrad settings count only with MoleGrad on)."""
    saved = config_from_dict(meta.get("model_config", {}))
    now = dataclasses.asdict(config)
    for name, flag in SHAPE_FIELDS.items():
        if name.startswith("molegrad_") and name != "molegrad_rank_k" and not (saved.get("molegrad_rank_k") or now["molegrad_rank_k"]):
            continue
        if name in saved and saved[name] != now[name]:
            raise CheckpointError(
                f"{flag}: the checkpoint at step {step} in {directory} has {name}={saved[name]}, this run {name}={now[name]}; "
                f"a resumed run keeps the shapes of its weights and optimizer state: resume with the flags it was saved with")


def resume_training_state(
    directory: Path, step: int, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], ctx: RunContext,
    flags: TrainFlags,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load model, optimizers and RNG saved at `step`; returns (rank_state, meta).

    The optimizers keep their saved state (moments, momentum buffers) but take every
    hyperparameter (LRs, weight decay) from `optimizers` as built from this run's flags, so a
    resume with another LR trains at that LR; the changed flags are printed and the new
    checkpoints' meta records the flags in use. Optimizer state is per rank (sharded optimizers
    keep only what their rank owns), so a run resumes only on the world size it was saved with;
    that, and a change of shapes (check_resumable), is a one-line CheckpointError. Temp files of
    a save that was killed are removed."""
    saved_meta = load_meta(directory, step)
    saved_world_size = saved_meta.get("world_size", 1)
    if saved_world_size != ctx.world_size:
        raise CheckpointError(
            f"checkpoint at step {step} in {directory} was saved with world size {saved_world_size}, "
            f"this run has world size {ctx.world_size}: resume with the same number of processes"
        )
    check_resumable(saved_meta, model.config, directory, step)
    if ctx.master:
        remove_stale_temp_files(directory)
    model_state, rank_state, meta = load_checkpoint(directory, step, rank=ctx.rank)
    load_model_state_strict(model, model_state, f"{directory} step {step}")
    assert rank_state is not None
    for opt, state in zip(optimizers, rank_state["optimizers"]):
        hyperparameters = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
        opt.load_state_dict(state)
        for group, now in zip(opt.param_groups, hyperparameters):
            group.update(now)
    set_rng_state(rank_state["rng"])
    before, now = meta.get("flags", {}), to_dict(flags)
    changed = [f"--{name} {before[name]} -> {value}" for name, value in now.items()
               if name in before and before[name] != value and name != "resume_from_step"]
    if changed:
        print0(f"flags changed since step {step}: {', '.join(changed)}")
    return rank_state, meta
