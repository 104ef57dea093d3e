"""Supervised finetuning on chat, multiple choice, math with the calculator, spelling.

    python -m scripts.chat_sft --model_tag=d20                 # from the midtrained model
    python -m scripts.chat_sft --source=base --model_tag=d20   # straight from the base model
    torchrun --standalone --nproc_per_node=2 -m scripts.chat_sft ...

Starts from the last checkpoint of --source (mid by default) and saves to sft_checkpoints/.
Rows are PADDED: one conversation each, a batch as long as its longest; the loss is on assistant
tokens only. The LR decays linearly to 0 over the run (--warmdown_ratio=1). Val: bits per byte of
the assistant tokens of held-out conversations (tasks.registry.chat_val_mixture, the set mid_train
measures too), and MMLU and ARC-Easy accuracy (answer letter logits, as chat_eval) on their first
--eval_metrics_max_problems problems. The loop is nanochat.chat_train.run_chat_training, shared
with mid_train. Flags: `--help`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from nanochat.chat_data import PADDED
from nanochat.chat_train import ChatStage, ChatTrainFlags, run_chat_training
from nanochat.common import RunContext
from nanochat.config import check, parse_args, source_field
from nanochat.evaluation import run_categorical
from nanochat.gpt import GPT
from nanochat.tokenizer import Tokenizer
from tasks.arc import ARC
from tasks.arithmetic import Arithmetic
from tasks.common import Task, TaskMixture
from tasks.gsm8k import GSM8K
from tasks.identity import Identity, TrainingRun
from tasks.registry import chat_val_mixture, make_task
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee

METRIC_TASKS = ("MMLU", "ARC-Easy")


@dataclass
class ChatSFTConfig(ChatTrainFlags):
    """Finetune a midtrained (or base) model on conversations."""

    source: str = source_field("mid", ("base", "mid"))
    device_batch_size: int = field(default=4, metadata={"help": "conversations per forward/backward on one device"})
    examples_per_step: int = field(default=32, metadata={"help": "conversations per optimizer step (all ranks)"})
    init_lr_frac: float = field(default=0.02, metadata={"help": "LRs as a fraction of --matrix_lr/--embedding_lr/--unembedding_lr"})
    warmdown_ratio: float = field(default=1.0, metadata={"help": "fraction of steps with linear LR warmdown"})
    eval_every: int = field(default=100, metadata={"help": "val bpb every N steps (-1 = only at the end, 0 = never)"})
    eval_examples: int = field(default=400, metadata={"help": "conversations per val bpb evaluation"})
    eval_metrics_max_problems: int = field(default=256, metadata={"help": "problems per task for MMLU/ARC-Easy accuracy at val time (0 = off)"})

    def validate(self) -> None:
        super().validate()
        check(self.examples_per_step >= 1, f"--examples_per_step: expected >= 1, got {self.examples_per_step}")
        check(self.eval_examples >= 1, f"--eval_examples: expected >= 1, got {self.eval_examples}")
        check(self.eval_metrics_max_problems >= 0, f"--eval_metrics_max_problems: expected >= 0, got {self.eval_metrics_max_problems}")

    def grad_accum(self, world_size: int) -> int:
        per_pass = self.device_batch_size * world_size
        check(self.examples_per_step % per_pass == 0,
              f"--examples_per_step: expected a positive multiple of device_batch_size*world_size = "
              f"{self.device_batch_size}*{world_size} = {per_pass}, got {self.examples_per_step}")
        return self.examples_per_step // per_pass

    def val_rows(self) -> int:
        return self.eval_examples


def train_mixture(source: str, history: Sequence[dict[str, Any]] = ()) -> Task:
    """`history`: the checkpoint metas this model was trained from and this stage (nanochat.chat_train),
    which the identity conversations describe; empty, they say nothing of the training."""
    # the synthetic tasks keep their share (offline they are most of the data: the hub tasks are
    # a few stand-in rows), so finetuning on chat does not unlearn the calculator and counting
    return TaskMixture([
        ARC("ARC-Easy", "train", source=source),  # 2.3K
        ARC("ARC-Challenge", "train", source=source),  # 1.1K
        GSM8K("main", "train", source=source),  # 7.5K
        SmolTalk("train", source=source, stop=10_000),  # 10K
        Identity(size=1000, run=TrainingRun.from_history(history)),
        Arithmetic(size=4000),
        SimpleSpelling(size=300),
        SpellingBee(size=4000),
    ])


def categorical_metrics() -> Callable[[GPT, Tokenizer, ChatSFTConfig, RunContext], dict[str, float]]:
    """The eval hook: accuracy on the first --eval_metrics_max_problems problems of each of
    METRIC_TASKS (each task loaded once, at the first evaluation)."""
    tasks: dict[str, Task] = {}

    def metrics(model: GPT, tokenizer: Tokenizer, cfg: ChatSFTConfig, ctx: RunContext) -> dict[str, float]:
        accuracies = {}
        for name in METRIC_TASKS:
            if name not in tasks:
                tasks[name] = make_task(name, cfg.task_source)
            accuracies[f"{name}_acc"] = run_categorical(model, tokenizer, tasks[name], cfg.eval_metrics_max_problems,
                                                        cfg.device_batch_size, ctx.device, ctx.rank, ctx.world_size)
        return accuracies

    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(ChatSFTConfig, argv, prog="python -m scripts.chat_sft")
    hook = categorical_metrics() if cfg.eval_metrics_max_problems > 0 else None
    return run_chat_training(cfg, ChatStage(name="sft", title="Chat SFT", mode=PADDED, train_mixture=train_mixture,
                                            val_mixture=chat_val_mixture, grad_accum=ChatSFTConfig.grad_accum,
                                            val_rows=ChatSFTConfig.val_rows, eval_hook=hook))


if __name__ == "__main__":
    main()
