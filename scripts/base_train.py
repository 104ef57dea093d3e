"""Pretrain the base model.

    python -m scripts.base_train --depth=6 --max_seq_len=512 --device_batch_size=32 --total_batch_size=16384
    torchrun --standalone --nproc_per_node=2 -m scripts.base_train ...
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 -m scripts.base_train ...

(multi-node: the same command on every machine, --node_rank=0..N-1; NANOCHAT_BASE_DIR on a shared
filesystem, since global rank 0 writes the model and meta and each rank its own state file.)

Flags: `--help`. Before the model is built, nanochat.memory's plan of a training step is checked
against the memory the device has. The loop, top to bottom: eval val bpb every --eval_every
steps, sample every --sample_every, checkpoint every --save_every (and at the end), then one
optimizer step over --total_batch_size tokens (gradient accumulation), with progress, MFU and ETA,
and the Guard (nanochat.trainer) that stops a non-finite or diverged run before it is saved.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from nanochat.checkpoint import checkpoint_dir
from nanochat.common import RunContext, device_summary, init_wandb, peak_flops, print0, run_main
from nanochat.config import check, parse_args, to_dict
from nanochat.dataloader import DataLoader
from nanochat.gpt import GPT, GPTConfig, config_from_depth, training_attention_backend
from nanochat.loss_eval import evaluate_bpb
from nanochat.memory import GiB, available_memory, memory_reserve, plan_memory
from nanochat.model_flags import ModelFlags, flag_errors
from nanochat.optim import setup_optimizers
from nanochat.report import log_section
from nanochat.molegrad import molegrad_layers
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.trainer import (
    AUTO_BATCH_REF_DEPTH,
    Guard,
    Progress,
    TrainFlags,
    auto_total_batch_size,
    format_duration,
    grad_accum_steps,
    resume_training_state,
    save_training_state,
    scaling_params,
    schedule,
    train_step,
)

SAMPLE_PROMPTS = ("The capital of France is", "def fibonacci(n):", "The meaning of life is")


@dataclass
class BaseTrainConfig(ModelFlags, TrainFlags):
    """Pretrain a GPT on the base_data shards."""

    depth: int = field(default=20, metadata={"help": "transformer blocks; sets width and heads"})
    max_seq_len: int = field(default=2048, metadata={"help": "context length in tokens"})
    total_batch_size: int = field(default=524288, metadata={
        "help": "tokens per optimizer step (all ranks); -1 = auto from the model size (nanochat.trainer.auto_total_batch_size)"})
    num_iterations: int = field(default=-1, metadata={"help": "optimizer steps (-1 = from --target_param_data_ratio)"})
    target_param_data_ratio: float = field(default=20.0, metadata={"help": "tokens per parameter when --num_iterations=-1"})
    ratio_params: str = field(default="all", metadata={
        "help": "the parameters --target_param_data_ratio counts: all (embeddings and value embeddings included) or "
                "scaling (the block Linears and the LM head, as upstream nanochat's 2026 rule of 12 per parameter)",
        "choices": ("all", "scaling")})
    eval_every: int = field(default=250, metadata={"help": "val bpb every N steps (-1 = only at the end, 0 = never)"})
    eval_tokens: int = field(default=20 * 524288, metadata={"help": "tokens per val bpb evaluation"})
    sample_every: int = field(default=2000, metadata={"help": "print samples every N steps (-1 = never)"})

    def validate(self) -> None:
        super().validate()
        check(self.depth >= 1, f"--depth: expected >= 1, got {self.depth}")
        check(self.max_seq_len >= 2, f"--max_seq_len: expected >= 2, got {self.max_seq_len}")
        check(self.total_batch_size == -1 or self.total_batch_size >= 1,
              f"--total_batch_size: expected a token count >= 1 (or -1 = auto), got {self.total_batch_size}")
        check(self.num_iterations >= -1, f"--num_iterations: expected >= 1 (or -1 = from --target_param_data_ratio), got {self.num_iterations}")
        check(self.num_iterations > 0 or self.target_param_data_ratio > 0,
              "--num_iterations: expected > 0 when --target_param_data_ratio <= 0")
        check(self.eval_tokens >= 1, f"--eval_tokens: expected >= 1, got {self.eval_tokens}")
        for name in ("eval_every", "sample_every"):
            check(getattr(self, name) >= -1, f"--{name}: expected >= -1, got {getattr(self, name)}")


def device_reserve(device: torch.device) -> int:
    """Bytes check_memory_fits keeps free beyond the plan on a GPU: max(2 GiB, 5% of its total
    memory), for what the plan does not count (the CUDA context, allocator fragmentation, library
    workspaces). None on CPU, whose MemAvailable already leaves the system its share."""
    if device.type == "cuda":
        return memory_reserve(torch.cuda.mem_get_info(device)[1])
    if device.type == "mps":
        return memory_reserve(torch.mps.recommended_max_memory())
    return 0


def check_memory_fits(config: GPTConfig, device_batch_size: int, grad_accum: int, ctx: RunContext,
                      precision: dict[str, str] | None = None) -> None:
    """ConfigError when nanochat.memory's plan of one training step, plus device_reserve, exceeds
    the memory this device has available (free GPU memory, MemAvailable on CPU); nothing is checked
    where that is unknown."""
    available = available_memory(ctx.device)
    if available is None:
        return
    dtype = "bfloat16" if ctx.dtype == torch.bfloat16 else "float32"
    peak = plan_memory(config, device_batch_size, dtype, grad_accum, "cuda" if ctx.device_type == "cuda" else "cpu",
                       **(precision or {})).peak
    reserve = device_reserve(ctx.device)
    kept = (f", of which {reserve / GiB:.1f} GiB stay in reserve (max(2 GiB, 5% of the total) for the CUDA context, "
            f"fragmentation and workspaces, which the plan does not count)") if reserve else ""
    check(peak + reserve <= available,
          f"--depth={config.n_layer} (width {config.n_embd}) with --device_batch_size={device_batch_size} x "
          f"{config.sequence_len} tokens: the memory plan of a training step needs {peak / GiB:.1f} GiB, "
          f"{ctx.device} has {available / GiB:.1f} GiB available{kept} (python -m nanochat.memory shows the plan); "
          f"lower --depth, --device_batch_size or --max_seq_len, or try --memory_mode=low (or lowest)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(BaseTrainConfig, argv, prog="python -m scripts.base_train")
    return run_main(train, cfg)


def train(cfg: BaseTrainConfig, ctx) -> dict[str, Any]:
    print0(device_summary(ctx))
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device=ctx.device)
    with flag_errors():
        model_config = config_from_depth(cfg.depth, tokenizer.get_vocab_size(), cfg.max_seq_len, **cfg.model_options())
    if cfg.total_batch_size == -1:
        reference = config_from_depth(AUTO_BATCH_REF_DEPTH, tokenizer.get_vocab_size(), cfg.max_seq_len)
        per_pass = cfg.device_batch_size * cfg.max_seq_len * ctx.world_size
        cfg = replace(cfg, total_batch_size=auto_total_batch_size(model_config, reference, per_pass))
        print0(f"auto batch size: {cfg.total_batch_size:,} tokens per step (--total_batch_size=-1)")
    grad_accum = grad_accum_steps(cfg.total_batch_size, cfg.device_batch_size, cfg.max_seq_len, ctx.world_size)
    check_memory_fits(model_config, cfg.device_batch_size, grad_accum, ctx, cfg.precision_options())
    with torch.device(ctx.device):  # built where it trains: no fp32 copy in host RAM on the way to a GPU
        model = GPT(model_config)
    model.init_weights()
    optimizers = setup_optimizers(model, cfg.unembedding_lr, cfg.embedding_lr, cfg.matrix_lr, cfg.weight_decay,
                                  **cfg.optimizer_options())
    forward = torch.compile(model, dynamic=False) if cfg.compile else model

    num_params = model.num_params()
    flops_per_token = model.estimate_flops()
    num_iterations = cfg.num_iterations
    if num_iterations <= 0:
        counted = num_params if cfg.ratio_params == "all" else scaling_params(model_config)
        num_iterations = max(1, int(cfg.target_param_data_ratio * counted) // cfg.total_batch_size)
    print0(f"model: depth {cfg.depth}, width {model_config.n_embd}, {model_config.n_head} heads "
           f"({model_config.n_kv_head} kv), {num_params:,} params, {flops_per_token:.3e} FLOPs/token; training attention: "
           f"{training_attention_backend(ctx.device, ctx.dtype, model_config.n_head, model_config.head_dim, cfg.max_seq_len)}")
    print0(f"batch: {cfg.device_batch_size} x {cfg.max_seq_len} x {ctx.world_size} ranks x {grad_accum} accum = "
           f"{cfg.total_batch_size:,} tokens/step; {num_iterations} steps; compute {ctx.dtype} on {ctx.device}")
    compressed = molegrad_layers(model)
    if compressed:
        print0(f"MoleGrad: rank {model_config.molegrad_rank_k} on {len(compressed)} Linears "
               f"({model_config.molegrad_targets}), {model_config.molegrad_momentum} momentum, "
               f"{model_config.molegrad_power_iters} power iteration(s), decay {model_config.molegrad_warm_start_decay}")

    ckpt_dir = checkpoint_dir("base", cfg.model_tag or f"d{cfg.depth}")
    start_step, loader_state, val_bpb = 0, None, None
    if cfg.resume_from_step >= 0:
        check(num_iterations >= cfg.resume_from_step, f"--num_iterations={num_iterations}: the run resumes at step "
              f"{cfg.resume_from_step}; expected at least that many steps")
        rank_state, meta = resume_training_state(ckpt_dir, cfg.resume_from_step, model, optimizers, ctx, cfg)
        start_step, loader_state, val_bpb = cfg.resume_from_step, rank_state["loader"], meta.get("val_bpb")
        print0(f"resumed from {ckpt_dir} step {start_step}")
    guard = Guard(cfg, ckpt_dir, ctx, model_config.vocab_size, start_step if cfg.resume_from_step >= 0 else None)
    train_loader = DataLoader(tokenizer, cfg.device_batch_size, cfg.max_seq_len, "train", ctx.device,
                              ctx.rank, ctx.world_size, state=loader_state)

    def val_bpb_now() -> float:
        loader = DataLoader(tokenizer, cfg.device_batch_size, cfg.max_seq_len, "val", ctx.device, ctx.rank, ctx.world_size)
        steps = max(1, cfg.eval_tokens // (cfg.device_batch_size * cfg.max_seq_len * ctx.world_size))
        return evaluate_bpb(model, loader, steps, token_bytes, ctx)

    progress = Progress(num_iterations, cfg.total_batch_size, flops_per_token, peak_flops(ctx) * ctx.world_size, start_step)
    wandb_run = init_wandb("nanochat", cfg.run, to_dict(cfg), ctx.master)
    losses: list[float] = []
    history: list[dict[str, float]] = []

    step = start_step
    while True:
        last = step == num_iterations
        if cfg.eval_every != 0 and (last or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
            val_bpb = val_bpb_now()
            print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
            wandb_run.log({"val/bpb": val_bpb}, step=step)
            history.append({"step": step, "val_bpb": val_bpb})
        if ctx.master and cfg.sample_every > 0 and step > 0 and (last or step % cfg.sample_every == 0):
            for prompt in SAMPLE_PROMPTS:
                ids = model.generate(tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id()), max_tokens=16, temperature=0.0)
                print0(f"  sample: {prompt!r} -> {tokenizer.decode(ids)!r}")
        if step > start_step and (last or (cfg.save_every > 0 and step % cfg.save_every == 0)):
            meta = {"stage": "base", "flags": to_dict(cfg), "model_config": asdict(model_config), "val_bpb": val_bpb,
                    "num_iterations": num_iterations}
            save_training_state(ckpt_dir, step, model, optimizers, train_loader.state_dict(), meta, ctx, cfg.keep_checkpoints, guard)
        if last:
            break

        lrm, momentum = schedule(step, num_iterations, cfg)
        progress.start()
        loss, grad_norm = train_step(forward, optimizers, train_loader, grad_accum, ctx, lrm, momentum, cfg.grad_clip)
        ctx.synchronize()
        stats = progress.stop(step)
        losses.append(loss)
        # MoleGrad: the share of the layers' input energy that their subspaces Q capture (mean over layers)
        captured = float(torch.stack([m.captured_energy for m in compressed]).mean()) if compressed else None
        print0(f"step {step + 1:05d}/{num_iterations} | loss {loss:.4f} | grad norm {grad_norm:.3f} | lrm {lrm:.2f} | "
               f"{stats['dt'] * 1000:.0f} ms | {stats['tok_per_s']:,.0f} tok/s | MFU {stats['mfu']:.1f}% | "
               f"ETA {format_duration(stats['eta_s'])}" + (f" | Q captures {captured:.2f}" if captured is not None else ""))
        wandb_run.log({"train/loss": loss, "train/grad_norm": grad_norm, "train/lrm": lrm,
                       "train/tok_per_s": stats["tok_per_s"], "train/mfu": stats["mfu"],
                       **({"train/captured_energy": captured} if captured is not None else {})}, step=step + 1)
        guard.check(step, loss, grad_norm, model)
        step += 1

    wandb_run.finish()
    tok_per_s = cfg.total_batch_size * len(progress.recent) / sum(progress.recent) if progress.recent else 0.0
    log_section("Base model training", {
        "flags": to_dict(cfg), "num_params": num_params, "flops_per_token": flops_per_token,
        "num_iterations": num_iterations, "tokens": num_iterations * cfg.total_batch_size, "val_bpb": val_bpb,
        "tok_per_s": tok_per_s, "curves": {"train_loss": [[start_step + i + 1, l] for i, l in enumerate(losses)],
                   "val_bpb": [[h["step"], h["val_bpb"]] for h in history]},
    })
    return {"losses": losses, "val_bpb": val_bpb, "history": history, "num_iterations": num_iterations,
            "tok_per_s": tok_per_s, "checkpoint_dir": str(ckpt_dir), "num_params": num_params}


if __name__ == "__main__":
    main()
