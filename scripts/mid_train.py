"""Midtrain: teach a base model the conversation tokens, multiple choice and the calculator tool.

    python -m scripts.mid_train --model_tag=d20
    torchrun --standalone --nproc_per_node=2 -m scripts.mid_train --model_tag=d20

Starts from the last base checkpoint of --source_tag (default --model_tag, else the newest) and
saves to mid_checkpoints/<--model_tag, default the source's tag>. Rows are PACKED: T + 1 tokens
of whole conversations, BOS-separated; the loss is on assistant tokens only (tool outputs are
never trained). Val: bits per byte of the assistant tokens of held-out conversations
(tasks.registry.chat_val_mixture, the set chat_sft measures too). The loop is
nanochat.chat_train.run_chat_training, shared with chat_sft. Flags: `--help`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from nanochat.chat_data import PACKED
from nanochat.chat_train import ChatStage, ChatTrainFlags, run_chat_training
from nanochat.config import check, parse_args, source_field
from nanochat.trainer import grad_accum_steps
from tasks.arithmetic import Arithmetic
from tasks.common import Task, TaskMixture
from tasks.gsm8k import GSM8K
from tasks.identity import Identity, TrainingRun
from tasks.mmlu import MMLU
from tasks.registry import chat_val_mixture
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee


@dataclass
class MidTrainConfig(ChatTrainFlags):
    """Midtrain a base model on conversations, multiple choice and tool use."""

    source: str = source_field("base", ("base",))
    total_batch_size: int = field(default=524288, metadata={"help": "tokens per optimizer step (all ranks)"})
    eval_tokens: int = field(default=20 * 524288, metadata={"help": "tokens per val bpb evaluation"})

    def validate(self) -> None:
        super().validate()
        check(self.eval_tokens >= 1, f"--eval_tokens: expected >= 1, got {self.eval_tokens}")

    def grad_accum(self, world_size: int) -> int:
        return grad_accum_steps(self.total_batch_size, self.device_batch_size, self.max_seq_len, world_size)

    def val_rows(self) -> int:
        return max(1, self.eval_tokens // self.max_seq_len)


def train_mixture(source: str, history: Sequence[dict[str, Any]] = ()) -> Task:
    """`history`: the checkpoint metas this model was trained from and this stage (nanochat.chat_train),
    which the identity conversations describe; empty, they say nothing of the training."""
    # Online, SmolTalk and MMLU dominate. Offline the hub tasks are a few stand-in rows each, so
    # the synthetic tasks are the data: calculator calls and letter counting get most of it, and
    # spelling words out (memorising each word's letters, which a tiny model cannot) a little.
    return TaskMixture([
        SmolTalk("train", source=source),  # general chat (460K conversations online)
        MMLU("auxiliary_train", "train", source=source),  # multiple choice (100K)
        GSM8K("main", "train", source=source),  # math with calculator calls (7.5K)
        Arithmetic(size=50_000),  # calculator calls on generated word problems
        Identity(size=1000, run=TrainingRun.from_history(history)),  # who the model is
        SimpleSpelling(size=20_000),  # word -> letters
        SpellingBee(size=150_000),  # count letters with a Python call (copying the word: the harder one)
    ])


STAGE = ChatStage(name="mid", title="Midtraining", mode=PACKED, train_mixture=train_mixture, val_mixture=chat_val_mixture,
                  grad_accum=MidTrainConfig.grad_accum, val_rows=MidTrainConfig.val_rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(MidTrainConfig, argv, prog="python -m scripts.mid_train")
    return run_chat_training(cfg, STAGE)


if __name__ == "__main__":
    main()
