"""Reinforcement learning on GSM8K-style math with the calculator tool (on-policy, GRPO-like).

    python -m scripts.chat_rl --model_tag=d20                # from the SFT model
    python -m scripts.chat_rl --source=mid --task=arithmetic  # offline problems only
    torchrun --standalone --nproc_per_node=2 -m scripts.chat_rl ...

Starts from the last checkpoint of --source (sft by default) and saves to rl_checkpoints/ (model,
optimizers and RNG: --resume_from_step continues exactly). One step:

1. rollouts: for each of --examples_per_step questions, --num_samples completions through the
   Engine (model in eval mode, no grad; the calculator's output is forced into the reply), all
   questions decoded together, --decode_batch_size completions at a time.
   Question j of step s is train example (s * examples_per_step + j) mod len(task), sampled with
   seeds from (--seed, s, j): a resumed run draws the same questions and the same samples.
2. rewards: task.reward(conversation, reply), 1.0 for the right `#### N`, else 0.0; advantage of
   a sample = its reward - the mean reward of its question's group (no std normalisation).
3. one optimizer step (trainer.train_step: micro-batches of --device_batch_size rows, clipping,
   the shared LR schedule) on the policy-gradient loss over the sampled tokens only (prompt and
   tool-output tokens are not the policy's actions, so they are masked out):

       loss = -Σ_{rows b, sampled t} A_b · log p(token_bt) / (number of sampled tokens)

--task: gsm8k (GSM8K train; --task_source=auto reads the hub when reachable, else the offline
stand-in), arithmetic (synthetic GSM8K-style problems, offline), auto (both, mixed), or synthetic
(arithmetic and SpellingBee letter counting, mixed, offline).
pass@--num_samples on the held-out problems (test splits) every --eval_every steps.
Flags: `--help`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from nanochat import distributed
from nanochat.chat_data import rows_to_batch
from nanochat.chat_train import ChatTrainFlags, start_chat_stage
from nanochat.common import RunContext, device_summary, init_wandb, print0, run_main
from nanochat.config import check, parse_args, source_field, to_dict
from nanochat.engine import DECODE_BATCH_SIZE, Engine
from nanochat.evaluation import run_generative
from nanochat.report import log_section
from nanochat.tokenizer import Tokenizer
from nanochat.trainer import Guard, format_duration, save_training_state, schedule, train_step
from tasks.arithmetic import Arithmetic
from tasks.common import Task, TaskMixture
from tasks.gsm8k import GSM8K
from tasks.spellingbee import SpellingBee

TASKS = ("auto", "gsm8k", "arithmetic", "synthetic")
ARITHMETIC_TRAIN_SIZE = 100_000  # generated on demand: effectively never repeats
ARITHMETIC_TEST_SIZE = 1000
SPELLING_TRAIN_SIZE = 100_000
SPELLING_TEST_SIZE = 1000


@dataclass
class ChatRLConfig(ChatTrainFlags):
    """On-policy RL on math word problems with the calculator tool."""

    source: str = source_field("sft", ("base", "mid", "sft"))
    num_iterations: int = field(default=200, metadata={"help": "optimizer steps"})
    task: str = field(default="auto", metadata={"help": "training problems: gsm8k, arithmetic, auto (both), or synthetic "
                                                       "(arithmetic and letter counting, offline)", "choices": TASKS})
    examples_per_step: int = field(default=16, metadata={"help": "questions per optimizer step (all ranks)"})
    num_samples: int = field(default=8, metadata={"help": "completions per question (the group of the baseline)"})
    max_new_tokens: int = field(default=256, metadata={"help": "tokens per completion at most (tool output included)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=50, metadata={"help": "sample from the top k tokens (0 = all)"})
    device_batch_size: int = field(default=8, metadata={"help": "completions per forward/backward on one device"})
    decode_batch_size: int = field(default=DECODE_BATCH_SIZE, metadata={
        "help": "completions decoded together in rollouts and pass@k (the KV cache holds this many rows of prompt + "
                "--max_new_tokens positions)"})
    init_lr_frac: float = field(default=0.05, metadata={"help": "LRs as a fraction of --matrix_lr/--embedding_lr/--unembedding_lr"})
    warmdown_ratio: float = field(default=1.0, metadata={"help": "fraction of steps with linear LR warmdown"})
    max_seq_len: int = field(default=1024, metadata={"help": "context length in tokens (prompt + completion)"})
    eval_every: int = field(default=60, metadata={"help": "pass@k every N steps (-1 = only at the end, 0 = never)"})
    eval_examples: int = field(default=200, metadata={"help": "held-out problems per task per pass@k evaluation"})

    def validate(self) -> None:
        super().validate()
        check(self.num_iterations >= 1, f"--num_iterations: expected >= 1, got {self.num_iterations}")
        check(self.examples_per_step >= 1, f"--examples_per_step: expected >= 1, got {self.examples_per_step}")
        check(self.num_samples >= 2, f"--num_samples: expected >= 2 (the baseline is the group mean), got {self.num_samples}")
        check(self.max_new_tokens >= 1, f"--max_new_tokens: expected >= 1, got {self.max_new_tokens}")
        check(self.decode_batch_size >= 1, f"--decode_batch_size: expected >= 1, got {self.decode_batch_size}")
        check(self.temperature > 0, f"--temperature: expected > 0 (sampling), got {self.temperature}")
        check(self.top_k >= 0, f"--top_k: expected >= 0, got {self.top_k}")
        check(self.eval_examples >= 1, f"--eval_examples: expected >= 1, got {self.eval_examples}")


# ---------------------------------------------------------------------------------------------
# tasks, rewards, advantages

def train_task(name: str, source: str) -> Task:
    tasks = {"gsm8k": lambda: [GSM8K("main", "train", source=source)],
             "arithmetic": lambda: [Arithmetic(size=ARITHMETIC_TRAIN_SIZE, split="train")],
             "auto": lambda: [GSM8K("main", "train", source=source), Arithmetic(size=ARITHMETIC_TRAIN_SIZE, split="train")],
             "synthetic": lambda: [Arithmetic(size=ARITHMETIC_TRAIN_SIZE, split="train"),
                                   SpellingBee(size=SPELLING_TRAIN_SIZE, split="train")]}[name]()
    return tasks[0] if len(tasks) == 1 else TaskMixture(tasks)


def eval_tasks(name: str, source: str) -> dict[str, Task]:
    """Held-out problems, one pass@k per task."""
    tasks: dict[str, Task] = {}
    if name in ("gsm8k", "auto"):
        tasks["gsm8k"] = GSM8K("main", "test", source=source)
    if name in ("arithmetic", "auto", "synthetic"):
        tasks["arithmetic"] = Arithmetic(size=ARITHMETIC_TEST_SIZE, split="test")
    if name == "synthetic":
        tasks["spellingbee"] = SpellingBee(size=SPELLING_TEST_SIZE, split="test")
    return tasks


def scoring_task(task: Task, index: int) -> Task:
    """The task that scores example `index` (a mixture delegates to its member)."""
    return task.locate(index)[0] if isinstance(task, TaskMixture) else task


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """rewards (num_samples,) of one question -> reward minus the group mean (REINFORCE with a
    per-question baseline; no std normalisation, so a group that all agrees gives 0)."""
    return rewards - rewards.mean()


# ---------------------------------------------------------------------------------------------
# the policy-gradient loss

class PolicyGradientLoss(torch.nn.Module):
    """The GPT seen by trainer.train_step: forward(inputs, (targets, token_weights)) ->
    Σ token_weights · NLL. With token_weights = advantage · grad_accum / (sampled tokens of the
    step) on sampled tokens (0 elsewhere), train_step's sum of loss / grad_accum over the
    micro-batches is -Σ A · log p / N, and its mean loss is that same value."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        targets, token_weights = batch  # (B, T) each; targets -1 where token_weights is 0
        nll = self.model(inputs, targets, loss_reduction="none")  # (B, T), 0 where targets == -1
        return (token_weights * nll.float()).sum()


def policy_gradient_batches(rows: list[tuple[list[int], list[int]]], advantages: list[float], batch_size: int,
                            pad_id: int, device: torch.device) -> tuple[list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]], int]:
    """Micro-batches (inputs, (targets, token_weights)) of the rollouts `rows` (ids, mask) and the
    number of sampled tokens N they train on; see PolicyGradientLoss for token_weights."""
    num_tokens = sum(sum(mask[1:]) for _, mask in rows)
    grad_accum = -(-len(rows) // batch_size)
    batches = []
    for start in range(0, len(rows), batch_size):
        inputs, targets = rows_to_batch(rows[start:start + batch_size], pad_id)  # (B, L - 1)
        row_advantages = torch.tensor(advantages[start:start + batch_size], dtype=torch.float32).view(-1, 1)  # (B, 1)
        token_weights = (targets >= 0).float() * row_advantages * grad_accum / max(num_tokens, 1)  # (B, L - 1)
        batches.append((inputs.to(device), (targets.to(device), token_weights.to(device))))
    return batches, num_tokens


# ---------------------------------------------------------------------------------------------
# rollouts

def question_positions(step: int, cfg: ChatRLConfig, rank: int, world_size: int) -> list[int]:
    """Run-wide positions of this rank's questions at `step` (question j of the step: rank, rank +
    world_size, ...); position p is train example p mod len(task)."""
    return [step * cfg.examples_per_step + j for j in range(rank, cfg.examples_per_step, world_size)]


def rollouts(engine: Engine, tokenizer: Tokenizer, task: Task, step: int, cfg: ChatRLConfig, rank: int,
             world_size: int) -> tuple[list[tuple[list[int], list[int]]], list[float], list[float]]:
    """(rows (ids, mask), rewards, advantages) of every sample of this rank's questions at `step`,
    in question order; the questions decode together (Engine.generate_many)."""
    positions = question_positions(step, cfg, rank, world_size)
    indices = [position % len(task) for position in positions]
    conversations = [task[index] for index in indices]
    prompts = [tokenizer.render_for_completion(conversation) for conversation in conversations]
    for index, prompt in zip(indices, prompts):
        if len(prompt) >= engine.max_len:
            raise ValueError(f"train problem {index}: the prompt ({len(prompt)} tokens) does not fit the model's "
                             f"{engine.max_len} positions: raise --max_seq_len")
    seeds = [cfg.seed + position * cfg.num_samples for position in positions]  # sample i uses seed + i: distinct over the run
    groups = {q: (sequences, masks) for q, sequences, masks in engine.generate_many(
        prompts, cfg.num_samples, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, seeds=seeds,
        batch_size=cfg.decode_batch_size)}
    rows, rewards, advantages = [], [], []
    for q, (index, conversation, prompt) in enumerate(zip(indices, conversations, prompts)):
        sequences, masks = groups[q]
        scorer = scoring_task(task, index)
        group = torch.tensor([scorer.reward(conversation, tokenizer.decode(seq[len(prompt):])) for seq in sequences])
        rows += list(zip(sequences, masks))
        rewards += group.tolist()
        advantages += group_advantages(group).tolist()
    return rows, rewards, advantages


# ---------------------------------------------------------------------------------------------
# the loop

def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(ChatRLConfig, argv, prog="python -m scripts.chat_rl")
    return run_main(train, cfg)


def mean_over_ranks(values: list[float], ctx: RunContext) -> float:
    total = torch.tensor([sum(values), len(values)], dtype=torch.float64, device=ctx.device)
    if ctx.ddp:
        distributed.all_reduce(total, "rl rewards").wait()
    return float(total[0] / total[1].clamp(min=1))


def train(cfg: ChatRLConfig, ctx: RunContext) -> dict[str, Any]:
    print0(device_summary(ctx))
    check(cfg.examples_per_step % ctx.world_size == 0,
          f"--examples_per_step: expected a multiple of the world size {ctx.world_size}, got {cfg.examples_per_step}")
    start = start_chat_stage(cfg, "rl", ctx)
    tokenizer = start.tokenizer
    model, optimizers, src_dir, src_step, ckpt_dir = start.model, start.optimizers, start.source_dir, start.source_step, start.checkpoint_dir
    objective = PolicyGradientLoss(torch.compile(model, dynamic=True) if cfg.compile else model)
    start_step = start.start_step
    check(cfg.num_iterations >= start_step, f"--num_iterations={cfg.num_iterations}: the run resumes at step {start_step}; "
          f"expected at least that many steps")
    guard = Guard(cfg, ckpt_dir, ctx, None, start_step if start.resumed is not None else None)  # not a cross-entropy

    task = train_task(cfg.task, cfg.task_source)
    held_out = eval_tasks(cfg.task, cfg.task_source)
    engine = Engine(model, tokenizer)
    print0(f"model: depth {model.config.n_layer}, width {model.config.n_embd}, {model.num_params():,} params")
    print0(f"rl: {len(task):,} train problems ({cfg.task}); {cfg.examples_per_step} questions x {cfg.num_samples} samples "
           f"per step; {cfg.num_iterations} steps; compute {ctx.dtype} on {ctx.device}")

    def pass_at_k() -> dict[str, float]:
        model.eval()
        with torch.no_grad(), ctx.autocast():
            scores = {f"{name}_pass@{cfg.num_samples}": run_generative(
                engine, tokenizer, held, cfg.eval_examples, cfg.num_samples, cfg.max_new_tokens, cfg.temperature,
                cfg.top_k or None, ctx.device, ctx.rank, ctx.world_size, batch_size=cfg.decode_batch_size)
                for name, held in held_out.items()}
        model.train()
        return scores

    wandb_run = init_wandb("nanochat-rl", cfg.run, to_dict(cfg), ctx.master)
    losses: list[float] = []
    mean_rewards: list[float] = []
    history: list[dict[str, float]] = []
    scores: dict[str, float] = {}
    step_times: list[float] = []

    step = start_step
    while True:
        last = step == cfg.num_iterations
        if cfg.eval_every != 0 and (last or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
            scores = pass_at_k()
            print0(f"step {step:05d} | " + " | ".join(f"{name} {value:.4f}" for name, value in scores.items()))
            wandb_run.log({f"val/{name}": value for name, value in scores.items()}, step=step)
            history.append({"step": step, **scores})
        if step > start_step and (last or (cfg.save_every > 0 and step % cfg.save_every == 0)):
            meta = {"stage": "rl", "flags": to_dict(cfg), "model_config": asdict(model.config), "scores": scores,
                    "num_iterations": cfg.num_iterations, "source": {"kind": cfg.source, "dir": str(src_dir), "step": src_step},
                    **({"tokenizer_dir": start.tokenizer_dir} if start.tokenizer_dir else {})}
            save_training_state(ckpt_dir, step, model, optimizers, {}, meta, ctx, cfg.keep_checkpoints, guard)
        if last:
            break

        started = time.perf_counter()
        model.eval()
        with torch.no_grad(), ctx.autocast():
            rows, rewards, advantages = rollouts(engine, tokenizer, task, step, cfg, ctx.rank, ctx.world_size)
        model.train()
        batches, num_tokens = policy_gradient_batches(rows, advantages, cfg.device_batch_size, tokenizer.get_bos_token_id(), ctx.device)
        lrm, momentum = schedule(step, cfg.num_iterations, cfg)
        loss, grad_norm = train_step(objective, optimizers, batches, len(batches), ctx, lrm, momentum, cfg.grad_clip)
        ctx.synchronize()
        dt = time.perf_counter() - started
        mean_reward = mean_over_ranks(rewards, ctx)
        losses.append(loss)
        mean_rewards.append(mean_reward)
        step_times.append(dt)
        eta = (cfg.num_iterations - step - 1) * sum(step_times[-10:]) / len(step_times[-10:])
        print0(f"step {step + 1:05d}/{cfg.num_iterations} | reward {mean_reward:.3f} | loss {loss:+.5f} | grad norm "
               f"{grad_norm:.3f} | lrm {lrm:.2f} | {num_tokens / len(rows):.0f} sampled tok/row | {dt:.1f} s | ETA {format_duration(eta)}")
        wandb_run.log({"train/reward": mean_reward, "train/loss": loss, "train/grad_norm": grad_norm,
                       "train/lrm": lrm, "train/sampled_tokens": num_tokens}, step=step + 1)
        guard.check(step, loss, grad_norm, model)
        step += 1

    wandb_run.finish()
    log_section("Chat RL", {
        "flags": to_dict(cfg), "source": f"{src_dir} step {src_step}", "num_params": model.num_params(),
        "num_iterations": cfg.num_iterations, "mean_reward_last": mean_rewards[-1] if mean_rewards else None, **scores,
        "curves": {"train_reward": [[start_step + i + 1, r] for i, r in enumerate(mean_rewards)],
                   **{name: [[h["step"], h[name]] for h in history] for name in scores}},
    })
    return {"losses": losses, "rewards": mean_rewards, "scores": scores, "history": history,
            "checkpoint_dir": str(ckpt_dir), "source_dir": str(src_dir), "source_step": src_step}


if __name__ == "__main__":
    main()
