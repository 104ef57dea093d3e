"""The training loop of the chat stages mid_train and chat_sft (and chat_rl's flags).

It lives in the library, not in a script, because two scripts run it; each brings its flags (a
`ChatTrainFlags`), its task mixtures, batch sizes and batching mode (a `ChatStage`). The loop has
the shape of scripts/base_train.py: val bits per byte every --eval_every steps, checkpoint every
--save_every, one optimizer step with gradient accumulation, progress with ETA and MFU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from nanochat.chat_data import PADDED, ChatBatches, Mixture, epoch_steps
from nanochat.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    checkpoint_history,
    is_checkpoint_path,
    load_model,
    resolve_checkpoint,
)
from nanochat.common import RunContext, device_summary, init_wandb, peak_flops, print0, run_main
from nanochat.config import CHECKPOINT_KINDS, TASK_SOURCES, CheckpointFlags, check, source_field, to_dict
from nanochat.gpt import GPT
from nanochat.loss_eval import evaluate_bpb
from nanochat.model_flags import flag_errors
from nanochat.optim import setup_optimizers
from nanochat.report import log_section
from nanochat.tokenizer import Tokenizer, get_tokenizer
from nanochat.trainer import (
    Guard,
    Progress,
    TrainFlags,
    format_duration,
    resume_training_state,
    save_training_state,
    schedule,
    train_step,
)


@dataclass
class ChatTrainFlags(TrainFlags, CheckpointFlags):
    """Flags shared by mid_train, chat_sft and chat_rl (each adds its batch and eval sizes):
    -i/--source, -c/--model_tag and --step name the checkpoint to start from (-c: a tag, a checkpoint
    directory or a model_NNNNNN.pt file); the run writes to <stage>_checkpoints/<the -c tag, default
    the source's directory name>."""

    source: str = source_field("base", ("base", "mid"))
    model_tag: str = field(default="", metadata={"short": "-c", "help": (
        "checkpoint to start from: a tag (d12), a checkpoint directory or a model_NNNNNN.pt file (that step); "
        "a tag also names the directory this run writes (default: the source's directory name)")})
    source_tag: str = field(default="", metadata={"help": "source checkpoint directory when it differs from --model_tag"})
    max_seq_len: int = field(default=2048, metadata={"help": "context length in tokens"})
    num_iterations: int = field(default=-1, metadata={"help": "optimizer steps (-1 = about one epoch of the mixture)"})
    eval_every: int = field(default=150, metadata={"help": "val bpb every N steps (-1 = only at the end, 0 = never)"})
    init_lr_frac: float = field(default=1.0, metadata={"help": "LRs as a fraction of --matrix_lr/--embedding_lr/--unembedding_lr"})
    task_source: str = field(default="auto", metadata={"help": "hub tasks: online, offline stand-ins, or auto", "choices": TASK_SOURCES})

    def validate(self) -> None:
        super().validate()
        check(self.max_seq_len >= 2, f"--max_seq_len: expected >= 2, got {self.max_seq_len}")
        check(self.init_lr_frac > 0, f"--init_lr_frac: expected > 0, got {self.init_lr_frac}")
        check(self.num_iterations >= -1, f"--num_iterations: expected >= 1 (or -1 = about one epoch), got {self.num_iterations}")
        check(self.eval_every >= -1, f"--eval_every: expected >= -1, got {self.eval_every}")


@dataclass
class ChatStage:
    """What one chat training stage brings to the shared loop."""

    name: str  # checkpoint kind and meta "stage": mid | sft
    title: str  # its section of the report card
    mode: str  # PACKED | PADDED
    # (task source, training history: the source's checkpoint_history metas, then this stage's
    # {"stage", "model_config", "device_type", "world_size"}) -> the training mixture
    train_mixture: Callable[[str, list[dict[str, Any]]], Mixture]
    val_mixture: Callable[[str], Mixture]  # task source -> held-out conversations
    grad_accum: Callable[[Any, int], int]  # (flags, world size) -> micro-batches per optimizer step
    val_rows: Callable[[Any], int]  # flags -> rows (all ranks) per val bpb evaluation
    eval_hook: Callable[[GPT, Tokenizer, ChatTrainFlags, RunContext], dict[str, float]] | None = None  # extra metrics at val time


def run_chat_training(cfg: ChatTrainFlags, stage: ChatStage) -> dict[str, Any]:
    """Set up the run, train (see `train`), report any expected failure as one line and exit != 0."""
    return run_main(lambda cfg, ctx: train(cfg, stage, ctx), cfg)


@dataclass
class StartingPoint:
    """Where a chat stage (mid, sft, rl) starts: its model, optimizers and tokenizer, from the
    source checkpoint (or an HF folder, --init_from_hf) or, when resuming, from its own saved state."""

    model: GPT
    optimizers: list[torch.optim.Optimizer]
    tokenizer: Tokenizer
    tokenizer_dir: str | None  # where the tokenizer came from when not the default one (meta records it)
    source_dir: Path
    source_step: int
    checkpoint_dir: Path  # where this stage writes
    start_step: int
    resumed: tuple[dict[str, Any], dict[str, Any]] | None  # (rank state, meta) of the resumed checkpoint
    history: list[dict[str, Any]]  # metas of the checkpoints the model was trained from, oldest first


def start_chat_stage(cfg: ChatTrainFlags, stage_name: str, ctx: RunContext) -> StartingPoint:
    """The model of -i/--source (--source_tag or -c, --step), or of --init_from_hf, with this run's
    memory options and context, its tokenizer, and its optimizers at --init_lr_frac; with
    --resume_from_step, the stage's own saved model, optimizers and RNG instead."""
    if cfg.init_from_hf:
        src_dir, src_step = Path(cfg.init_from_hf), 0
    else:
        tag = cfg.source_tag or cfg.model_tag
        try:
            src_dir, src_step = resolve_checkpoint(cfg.source, tag, cfg.step)
        except CheckpointError as e:
            earlier = [kind for kind in CHECKPOINT_KINDS[:CHECKPOINT_KINDS.index(stage_name)] if kind != cfg.source]
            hint = (f" (or start from an earlier stage with --source={'|'.join(earlier)})"
                    if earlier and not is_checkpoint_path(tag) else "")
            raise CheckpointError(f"{stage_name}: {e}{hint}") from None
    out_tag = cfg.model_tag if cfg.model_tag and not is_checkpoint_path(cfg.model_tag) else src_dir.name
    ckpt_dir = checkpoint_dir(stage_name, out_tag)
    resuming = cfg.resume_from_step >= 0
    overrides = {**cfg.memory_options(), "sequence_len": cfg.max_seq_len}
    with flag_errors():  # e.g. a MoleGrad rank above this model's width
        if resuming:
            model, meta = load_model(directory=ckpt_dir, step=cfg.resume_from_step, device=ctx.device, overrides=overrides,
                                     weights=False)
        elif cfg.init_from_hf:
            model, meta = load_model(hf_dir=cfg.init_from_hf, device=ctx.device, overrides=overrides)
        else:
            model, meta = load_model(directory=src_dir, step=src_step, device=ctx.device, overrides=overrides)
    model.train()
    tokenizer_dir = meta.get("tokenizer_dir")
    tokenizer = get_tokenizer(tokenizer_dir)
    lr = cfg.init_lr_frac
    optimizers = setup_optimizers(model, cfg.unembedding_lr * lr, cfg.embedding_lr * lr, cfg.matrix_lr * lr, cfg.weight_decay,
                                  **cfg.optimizer_options())
    resumed = None
    if resuming:
        resumed = resume_training_state(ckpt_dir, cfg.resume_from_step, model, optimizers, ctx, cfg)
        print0(f"resumed from {ckpt_dir} step {cfg.resume_from_step}")
    else:
        print0(f"{stage_name}: starting from {src_dir} step {src_step}")
    return StartingPoint(model, optimizers, tokenizer, tokenizer_dir, src_dir, src_step, ckpt_dir,
                         max(0, cfg.resume_from_step), resumed, checkpoint_history(meta))


def train(cfg: ChatTrainFlags, stage: ChatStage, ctx: RunContext) -> dict[str, Any]:
    print0(device_summary(ctx))
    grad_accum = stage.grad_accum(cfg, ctx.world_size)
    rows_per_step = cfg.device_batch_size * ctx.world_size * grad_accum

    start = start_chat_stage(cfg, stage.name, ctx)
    model, optimizers, src_dir, src_step, ckpt_dir = start.model, start.optimizers, start.source_dir, start.source_step, start.checkpoint_dir
    tokenizer = start.tokenizer
    token_bytes = tokenizer.token_bytes().to(ctx.device)
    forward = torch.compile(model, dynamic=stage.mode == PADDED) if cfg.compile else model
    start_step, loader_state, val_bpb = start.start_step, None, None
    if start.resumed is not None:
        rank_state, meta = start.resumed
        loader_state, val_bpb = rank_state["loader"], meta.get("val_bpb")

    this_stage = {"stage": stage.name, "model_config": asdict(model.config), "device_type": ctx.device_type,
                  "world_size": ctx.world_size}
    train_mixture = stage.train_mixture(cfg.task_source, [*start.history, this_stage])
    val_mixture = stage.val_mixture(cfg.task_source)
    train_loader = ChatBatches(tokenizer, train_mixture, stage.mode, cfg.device_batch_size, cfg.max_seq_len, ctx.device,
                               ctx.rank, ctx.world_size, state=loader_state)
    num_iterations = cfg.num_iterations
    if num_iterations <= 0:
        num_iterations = epoch_steps(tokenizer, train_mixture, stage.mode, cfg.max_seq_len, rows_per_step)
    check(num_iterations >= start_step, f"--num_iterations={num_iterations}: the run resumes at step {start_step}; "
          f"expected at least that many steps")
    guard = Guard(cfg, ckpt_dir, ctx, model.config.vocab_size, start_step if start.resumed is not None else None)
    val_steps = max(1, stage.val_rows(cfg) // (cfg.device_batch_size * ctx.world_size))
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

    peak = peak_flops(ctx)
    progress = Progress(num_iterations, rows_per_step * cfg.max_seq_len, flops_per_token, peak * ctx.world_size, start_step)
    wandb_run = init_wandb("nanochat-" + stage.name, cfg.run, to_dict(cfg), ctx.master)
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
            wandb_run.log({"val/bpb": val_bpb, **{f"val/{k}": v for k, v in metrics.items()}}, step=step)
            history.append({"step": step, "val_bpb": val_bpb, **metrics})
        if step > start_step and (last or (cfg.save_every > 0 and step % cfg.save_every == 0)):
            meta = {"stage": stage.name, "flags": to_dict(cfg), "model_config": asdict(model_config), "val_bpb": val_bpb,
                    "num_iterations": num_iterations, "source": {"kind": cfg.source, "dir": str(src_dir), "step": src_step},
                    **({"tokenizer_dir": start.tokenizer_dir} if start.tokenizer_dir else {})}
            save_training_state(ckpt_dir, step, model, optimizers, train_loader.state_dict(), meta, ctx, cfg.keep_checkpoints, guard)
        if last:
            break

        lrm, momentum = schedule(step, num_iterations, cfg)
        tokens_before = train_loader.tokens_served
        progress.start()
        loss, grad_norm = train_step(forward, optimizers, train_loader, grad_accum, ctx, lrm, momentum, cfg.grad_clip)
        ctx.synchronize()
        stats = progress.stop(step)
        tokens = (train_loader.tokens_served - tokens_before) * ctx.world_size
        tok_per_s = tokens / stats["dt"]
        if step > start_step:
            timed_tokens, timed_s = timed_tokens + tokens, timed_s + stats["dt"]
        mfu = progress.mfu(tok_per_s)
        losses.append(loss)
        print0(f"step {step + 1:05d}/{num_iterations} | loss {loss:.4f} | grad norm {grad_norm:.3f} | lrm {lrm:.2f} | "
               f"epoch {train_loader.epoch} | {stats['dt'] * 1000:.0f} ms | {tok_per_s:,.0f} tok/s | MFU {mfu:.1f}% | "
               f"ETA {format_duration(stats['eta_s'])}")
        wandb_run.log({"train/loss": loss, "train/grad_norm": grad_norm, "train/lrm": lrm,
                       "train/tok_per_s": tok_per_s, "train/mfu": mfu}, step=step + 1)
        guard.check(step, loss, grad_norm, model)
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
