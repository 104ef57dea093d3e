"""Chat training: conversation batches, and the training loop shared by mid_train and chat_sft.

A conversation is rendered by the tokenizer into (ids, mask), mask 1 on what the assistant says
(its text, its <|python_start|>calls<|python_end|> and <|assistant_end|>), 0 elsewhere (the
user, <|bos|>, and the tool's <|output_start|>output<|output_end|>). A row of n ids trains on
n - 1 positions:

    inputs[i]  = ids[i]
    targets[i] = ids[i + 1] where mask[i + 1] == 1, else -1 (ignored by the loss)

Two ways to make (B, T) batches (`ChatBatches`):
- packed (mid_train): every row is exactly T + 1 tokens of whole conversations, each starting
  with its own <|bos|>. Rows are filled best-fit from a small buffer of rendered conversations
  (the longest that still fits, until none does); what is left of the row is padding (<|bos|>
  in, -1 out). A conversation longer than T + 1 tokens is truncated to one full row.
- padded (chat_sft): one conversation per row, truncated to T + 1 tokens; a batch is as long as
  its longest row, shorter rows are padded (<|bos|> in, -1 out).
A conversation with nothing to train on within T + 1 tokens (a long prompt truncated before the
reply) is skipped: it would only add a loss of 0/0.

Distributed: rank r takes the mixture's examples r, r + world_size, r + 2 * world_size, ...
Exact resume: `state_dict()` is {"epoch", "position" (next of this rank's examples), "pending"
(mixture indices rendered but not yet placed in a row)}; rendering is deterministic, so
`ChatBatches(..., state=saved)` yields the same next batch an uninterrupted run would.

`run_chat_training(cfg, stage)` is the loop, in the same shape as scripts/base_train.py: val bits
per byte every --eval_every steps, checkpoint every --save_every, one optimizer step with
gradient accumulation, progress with ETA. Each script brings its flags (a `ChatTrainFlags`), its
task mixtures and its batching mode (a `ChatStage`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from nanochat.checkpoint import CheckpointError, checkpoint_dir, find_model_dir, last_step, load_checkpoint, load_meta
from nanochat.common import RunContext, init_wandb, print0
from nanochat.config import check, to_dict
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import log_section
from nanochat.tokenizer import Tokenizer, get_token_bytes, get_tokenizer
from nanochat.trainer import (
    run_training,
    Progress,
    TrainFlags,
    check_finite,
    format_duration,
    matmul_peak_flops,
    resume_training_state,
    save_training_state,
    schedule,
    train_step,
)
from tasks.common import SOURCES, Task

PACKED, PADDED = "packed", "padded"
MODES = (PACKED, PADDED)
PACK_BUFFER = 32  # rendered conversations a packed row chooses from (best fit)
ESTIMATE_SAMPLES = 1000  # conversations rendered to estimate the length of an epoch in packed rows


# ---------------------------------------------------------------------------------------------
# rendering

def render_for_training(tokenizer: Tokenizer, conversation: dict[str, Any], max_tokens: int) -> tuple[list[int], list[int]] | None:
    """(ids, mask) of a conversation truncated to `max_tokens`, or None when no target is trained
    (mask[1:] all 0: mask[0] is <|bos|>, which is never a target)."""
    ids, mask = tokenizer.render_conversation(conversation, max_tokens=max_tokens)
    return (ids, mask) if any(mask[1:]) else None


def rows_to_batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both (B, L - 1) int64, from B rows of (ids, mask) padded to the longest, L.
    targets[b, i] = ids[b][i + 1] where mask[b][i + 1] == 1, else -1; padding is never a target."""
    length = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([row_ids + [pad_id] * (length - len(row_ids)) for row_ids, _ in rows], dtype=torch.long)  # (B, L)
    mask = torch.tensor([row_mask + [0] * (length - len(row_mask)) for _, row_mask in rows], dtype=torch.bool)  # (B, L)
    return ids[:, :-1], ids[:, 1:].masked_fill(~mask[:, 1:], -1)


# ---------------------------------------------------------------------------------------------
# batches

class ChatBatches:
    """(inputs, targets) batches of a task mixture's conversations; see the module docstring."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        mixture: Task,
        mode: str,
        batch_size: int,
        seq_len: int,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        state: dict[str, Any] | None = None,
        loop: bool = True,
        pack_buffer: int = PACK_BUFFER,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {'|'.join(MODES)}, got {mode!r}")
        if batch_size < 1 or seq_len < 1 or pack_buffer < 1:
            raise ValueError(f"batch_size, seq_len and pack_buffer must be >= 1, got {batch_size}, {seq_len}, {pack_buffer}")
        self.tokenizer, self.mixture, self.mode = tokenizer, mixture, mode
        self.B, self.T = batch_size, seq_len
        self.device = torch.device(device)
        self.loop, self.pack_buffer = loop, pack_buffer
        self.pad_id = tokenizer.get_bos_token_id()
        self.indices = range(rank, len(mixture), world_size)  # this rank's examples, in mixture order
        if len(self.indices) == 0:
            raise ValueError(f"rank {rank} of {world_size} gets no examples from a mixture of {len(mixture)}")
        state = state or {"epoch": 0, "position": 0, "pending": []}
        self.epoch, self.position = state["epoch"], state["position"]
        # packed: rendered conversations waiting for a row, (mixture index, ids, mask)
        self.pending = [(index, *self._render(index)) for index in state["pending"]]
        self.tokens_served = 0  # input positions (B * L) yielded, padding included: the compute done

    def _render(self, index: int) -> tuple[list[int], list[int]] | None:
        return render_for_training(self.tokenizer, self.mixture[index], self.T + 1)

    def _next_example(self) -> tuple[int, list[int], list[int]]:
        """The next of this rank's conversations with something to train on; StopIteration at the
        end of the pass when not looping."""
        skipped = 0
        while True:
            if self.position == len(self.indices):
                if not self.loop:
                    raise StopIteration
                self.epoch, self.position = self.epoch + 1, 0
            index = self.indices[self.position]
            self.position += 1
            rendered = self._render(index)
            if rendered is not None:
                return index, *rendered
            skipped += 1
            if skipped >= len(self.indices):
                raise ValueError(f"no conversation of this rank's {len(self.indices)} has an assistant token within "
                                 f"the first {self.T + 1} tokens: raise --max_seq_len")

    def _packed_row(self) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []
        room = self.T + 1
        while room > 0:
            while len(self.pending) < self.pack_buffer:
                try:
                    self.pending.append(self._next_example())
                except StopIteration:
                    break
            fitting = [j for j, (_, conv_ids, _) in enumerate(self.pending) if len(conv_ids) <= room]
            if not fitting:
                break
            best = max(fitting, key=lambda j: len(self.pending[j][1]))  # longest that fits; ties: oldest
            _, conv_ids, conv_mask = self.pending.pop(best)
            ids += conv_ids
            mask += conv_mask
            room -= len(conv_ids)
        if room == self.T + 1:
            raise StopIteration  # nothing left (only when not looping)
        return ids + [self.pad_id] * room, mask + [0] * room

    def _next_row(self) -> tuple[list[int], list[int]]:
        if self.mode == PACKED:
            return self._packed_row()
        _, ids, mask = self._next_example()
        return ids, mask

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), (B, T) when packed, (B, L <= T) when padded; at the end of a pass that
        does not loop, the last batch may have fewer rows."""
        rows = []
        for _ in range(self.B):
            try:
                rows.append(self._next_row())
            except StopIteration:
                if not rows:
                    raise
                break
        inputs, targets = rows_to_batch(rows, self.pad_id)
        self.tokens_served += inputs.numel()
        non_blocking = self.device.type == "cuda"
        return inputs.to(self.device, non_blocking=non_blocking), targets.to(self.device, non_blocking=non_blocking)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch starts: resume with ChatBatches(..., state=this)."""
        return {"epoch": self.epoch, "position": self.position, "pending": [index for index, _, _ in self.pending]}


def epoch_steps(tokenizer: Tokenizer, mixture: Task, mode: str, seq_len: int, rows_per_step: int) -> int:
    """Optimizer steps in about one pass over `mixture` (at least 1).

    padded: one conversation per row, so len(mixture) // rows_per_step.
    packed: the mean length of up to ESTIMATE_SAMPLES evenly spaced conversations (as rendered,
    truncated, skipped) times len(mixture), over the tokens of a step; best-fit padding makes the
    true pass a few percent longer.
    """
    if mode == PADDED:
        return max(1, len(mixture) // rows_per_step)
    picks = range(0, len(mixture), max(1, len(mixture) // ESTIMATE_SAMPLES))
    lengths = [len(r[0]) if (r := render_for_training(tokenizer, mixture[i], seq_len + 1)) else 0 for i in picks]
    tokens = sum(lengths) / len(lengths) * len(mixture)
    return max(1, round(tokens / (rows_per_step * (seq_len + 1))))


# ---------------------------------------------------------------------------------------------
# model from a checkpoint

def load_weights(model: torch.nn.Module, state: dict[str, Any], source: str) -> None:
    """Every parameter of `model` from `state` (same names and shapes, else CheckpointError).
    Buffers and extra state (MoleGrad's tracked subspace) are taken where the checkpoint has them
    with the same shape and keep their fresh values otherwise, so a model trained dense can
    continue with MoleGrad and the other way round."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    if missing:
        raise CheckpointError(f"checkpoint {source} does not match the model: missing parameters {missing[:3]}")
    own = model.state_dict()
    for name, value in state.items():
        if name in params and value.shape != params[name].shape:
            raise CheckpointError(f"checkpoint {source} does not match the model: {name} has shape "
                                  f"{tuple(value.shape)}, model expects {tuple(params[name].shape)}")
    usable = {name: value for name, value in state.items()
              if name in own and (not isinstance(value, torch.Tensor) or value.shape == own[name].shape)}
    model.load_state_dict(usable, strict=False)


def model_from_checkpoint(directory: Path, step: int, cfg: TrainFlags, seq_len: int, device: torch.device,
                          load: bool = True) -> tuple[GPT, dict[str, Any]]:
    """The GPT saved at `step` in `directory` (architecture from its meta; memory options from
    `cfg`; context `seq_len`) and its meta. load=False: the architecture only (weights come from
    a resumed checkpoint)."""
    meta = load_meta(directory, step)
    try:
        config = GPTConfig(**{**meta["model_config"], **cfg.memory_options(), "sequence_len": seq_len})
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint metadata in {directory} step {step} has no usable model_config: {e}") from e
    model = GPT(config)
    if load:
        model_state, _, _ = load_checkpoint(directory, step, load_rank_state=False)
        load_weights(model, model_state, f"{directory} step {step}")
    return model.to(device), meta


# ---------------------------------------------------------------------------------------------
# flags and the loop

@dataclass
class ChatTrainFlags(TrainFlags):
    """Flags shared by mid_train and chat_sft (each adds its batch and eval sizes)."""

    source: str = field(default="base", metadata={"help": "checkpoint kind to start from", "choices": ("base", "mid")})
    source_tag: str = field(default="", metadata={"help": "source checkpoint directory (default --model_tag, else the newest)"})
    step: int = field(default=-1, metadata={"help": "source checkpoint step (-1 = the last)"})
    model_tag: str = field(default="", metadata={"help": "output checkpoint directory (default: the source's)"})
    max_seq_len: int = field(default=2048, metadata={"help": "context length in tokens"})
    num_iterations: int = field(default=-1, metadata={"help": "optimizer steps (-1 = about one epoch of the mixture)"})
    eval_every: int = field(default=150, metadata={"help": "val bpb every N steps (-1 = only at the end, 0 = never)"})
    init_lr_frac: float = field(default=1.0, metadata={"help": "LRs as a fraction of --matrix_lr/--embedding_lr/--unembedding_lr"})
    task_source: str = field(default="auto", metadata={"help": "hub tasks: online, offline stand-ins, or auto", "choices": SOURCES})

    def validate(self) -> None:
        super().validate()
        check(self.max_seq_len >= 2, f"--max_seq_len: expected >= 2, got {self.max_seq_len}")
        check(self.init_lr_frac > 0, f"--init_lr_frac: expected > 0, got {self.init_lr_frac}")
        check(self.step >= -1, f"--step: expected a step >= 0 (or -1), got {self.step}")

    def grad_accum(self, world_size: int) -> int:
        """Micro-batches per optimizer step, from the stage's batch-size flag."""
        raise NotImplementedError(f"{type(self).__name__} must define grad_accum()")

    def val_rows(self) -> int:
        """Rows (all ranks) per val bpb evaluation, from the stage's eval-size flag."""
        raise NotImplementedError(f"{type(self).__name__} must define val_rows()")


@dataclass
class ChatStage:
    """What one chat training stage brings to the shared loop."""

    name: str  # checkpoint kind and meta "stage": mid | sft
    title: str  # its section of the report card
    mode: str  # PACKED | PADDED
    train_mixture: Callable[[str], Task]  # task source -> the training mixture
    val_mixture: Callable[[str], Task]  # task source -> held-out conversations
    eval_hook: Callable[[GPT, Tokenizer, ChatTrainFlags, RunContext], dict[str, float]] | None = None  # extra metrics at val time


def run_chat_training(cfg: ChatTrainFlags, stage: ChatStage) -> dict[str, Any]:
    """Set up the run, train (see `train`), report any expected failure as one line and exit != 0."""
    return run_training(cfg, train, stage)


def source_directory(cfg: ChatTrainFlags, stage: ChatStage) -> Path:
    tag = cfg.source_tag or cfg.model_tag
    try:
        return find_model_dir(cfg.source, tag)
    except CheckpointError as e:
        hint = "" if cfg.source == "base" else " (or start from the base model with --source=base)"
        raise CheckpointError(f"{stage.name}: {e}{hint}") from None


def train(cfg: ChatTrainFlags, stage: ChatStage, ctx: RunContext) -> dict[str, Any]:
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device=ctx.device)
    grad_accum = cfg.grad_accum(ctx.world_size)
    rows_per_step = cfg.device_batch_size * ctx.world_size * grad_accum

    src_dir = source_directory(cfg, stage)
    src_step = cfg.step if cfg.step >= 0 else last_step(src_dir)
    ckpt_dir = checkpoint_dir(stage.name, cfg.model_tag or src_dir.name)
    resuming = cfg.resume_from_step >= 0
    if resuming:
        model, _ = model_from_checkpoint(ckpt_dir, cfg.resume_from_step, cfg, cfg.max_seq_len, ctx.device, load=False)
    else:
        model, _ = model_from_checkpoint(src_dir, src_step, cfg, cfg.max_seq_len, ctx.device)
    lr = cfg.init_lr_frac
    optimizers = model.setup_optimizers(cfg.unembedding_lr * lr, cfg.embedding_lr * lr, cfg.matrix_lr * lr, cfg.weight_decay)
    forward = torch.compile(model, dynamic=stage.mode == PADDED) if cfg.compile else model

    start_step, loader_state, val_bpb = 0, None, None
    if resuming:
        rank_state, meta = resume_training_state(ckpt_dir, cfg.resume_from_step, model, optimizers, ctx)
        start_step, loader_state, val_bpb = cfg.resume_from_step, rank_state["loader"], meta.get("val_bpb")
        print0(f"resumed from {ckpt_dir} step {start_step}")
    else:
        print0(f"{stage.name}: starting from {src_dir} step {src_step}")

    train_mixture = stage.train_mixture(cfg.task_source)
    val_mixture = stage.val_mixture(cfg.task_source)
    train_loader = ChatBatches(tokenizer, train_mixture, stage.mode, cfg.device_batch_size, cfg.max_seq_len, ctx.device,
                               ctx.rank, ctx.world_size, state=loader_state)
    num_iterations = cfg.num_iterations
    if num_iterations <= 0:
        num_iterations = epoch_steps(tokenizer, train_mixture, stage.mode, cfg.max_seq_len, rows_per_step)
    val_steps = max(1, cfg.val_rows() // (cfg.device_batch_size * ctx.world_size))
    model_config = model.config
    flops_per_token = model.estimate_flops()
    print0(f"model: depth {model_config.n_layer}, width {model_config.n_embd}, {model.num_params():,} params")
    print0(f"data: {len(train_mixture):,} train / {len(val_mixture):,} val conversations, {stage.mode} rows; "
           f"{cfg.device_batch_size} x {cfg.max_seq_len} x {ctx.world_size} ranks x {grad_accum} accum = "
           f"{rows_per_step} rows/step; {num_iterations} steps; compute {ctx.dtype} on {ctx.device}")

    def val_bpb_now() -> float:
        loader = ChatBatches(tokenizer, val_mixture, stage.mode, cfg.device_batch_size, cfg.max_seq_len, ctx.device,
                             ctx.rank, ctx.world_size, loop=False)
        return evaluate_bpb(model, loader, val_steps, token_bytes, ctx)

    def eval_metrics() -> dict[str, float]:
        if stage.eval_hook is None:
            return {}
        model.eval()
        with torch.no_grad(), ctx.autocast():
            metrics = stage.eval_hook(model, tokenizer, cfg, ctx)
        model.train()
        return metrics

    peak = matmul_peak_flops(ctx.device_type, ctx.dtype, size=4096 if ctx.device_type == "cuda" else 1024)
    progress = Progress(num_iterations, rows_per_step * cfg.max_seq_len, flops_per_token, peak * ctx.world_size, start_step)
    wandb_run = init_wandb("nanochat-" + stage.name, to_dict(cfg), ctx.master)
    losses: list[float] = []
    history: list[dict[str, float]] = []
    timed_tokens, timed_s = 0, 0.0  # over the steps after the first (warm-up)

    step = start_step
    while True:
        last = step == num_iterations
        if cfg.eval_every != 0 and (last or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
            val_bpb = val_bpb_now()
            metrics = eval_metrics()
            shown = "".join(f" | {name} {value:.4f}" for name, value in metrics.items())
            print0(f"step {step:05d} | val bpb {val_bpb:.4f}{shown}")
            wandb_run.log({"step": step, "val/bpb": val_bpb, **{f"val/{k}": v for k, v in metrics.items()}})
            history.append({"step": step, "val_bpb": val_bpb, **metrics})
        if step > start_step and (last or (cfg.save_every > 0 and step % cfg.save_every == 0)):
            meta = {"stage": stage.name, "flags": to_dict(cfg), "model_config": asdict(model_config), "val_bpb": val_bpb,
                    "num_iterations": num_iterations, "source": {"kind": cfg.source, "dir": str(src_dir), "step": src_step}}
            save_training_state(ckpt_dir, step, model, optimizers, train_loader.state_dict(), meta, ctx, cfg.keep_checkpoints)
            print0(f"saved checkpoint {ckpt_dir} step {step}")
        if last:
            break

        lrm, momentum = schedule(step, num_iterations, cfg)
        tokens_before = train_loader.tokens_served
        progress.start()
        loss, grad_norm = train_step(forward, optimizers, train_loader, grad_accum, ctx, lrm, momentum, cfg.grad_clip)
        ctx.synchronize()
        check_finite(loss, step, ckpt_dir)
        stats = progress.stop(step)
        tokens = (train_loader.tokens_served - tokens_before) * ctx.world_size
        tok_per_s = tokens / stats["dt"]
        if step > start_step:
            timed_tokens, timed_s = timed_tokens + tokens, timed_s + stats["dt"]
        mfu = 100.0 * tok_per_s * flops_per_token / (peak * ctx.world_size)
        losses.append(loss)
        print0(f"step {step + 1:05d}/{num_iterations} | loss {loss:.4f} | grad norm {grad_norm:.3f} | lrm {lrm:.2f} | "
               f"epoch {train_loader.epoch} | {stats['dt'] * 1000:.0f} ms | {tok_per_s:,.0f} tok/s | MFU {mfu:.1f}% | "
               f"ETA {format_duration(stats['eta_s'])}")
        wandb_run.log({"step": step + 1, "train/loss": loss, "train/grad_norm": grad_norm, "train/lrm": lrm,
                       "train/tok_per_s": tok_per_s, "train/mfu": mfu})
        step += 1

    wandb_run.finish()
    tok_per_s = timed_tokens / timed_s if timed_s else 0.0
    log_section(stage.title, {
        "flags": to_dict(cfg), "source": f"{src_dir} step {src_step}", "num_params": model.num_params(),
        "num_iterations": num_iterations, "rows_per_step": rows_per_step, "val_bpb": val_bpb, "tok_per_s": tok_per_s,
        "curves": {"train_loss": [[start_step + i + 1, loss] for i, loss in enumerate(losses)],
                   "val_bpb": [[h["step"], h["val_bpb"]] for h in history]},
    })
    return {"losses": losses, "val_bpb": val_bpb, "history": history, "num_iterations": num_iterations,
            "checkpoint_dir": str(ckpt_dir), "source_dir": str(src_dir), "source_step": src_step,
            "tok_per_s": tok_per_s, "step_s": timed_s / max(1, len(losses) - 1)}
