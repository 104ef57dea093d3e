"""The chat evaluation tasks by the names chat_eval takes on its command line (-a/--tasks), and
the held-out chat mixture on which mid_train and chat_sft both measure val bpb.

    task = make_task("GSM8K", source="offline")
"""

from __future__ import annotations

from typing import Any, Callable

from tasks.arc import ARC
from tasks.arithmetic import Arithmetic
from tasks.common import Task, TaskMixture
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.identity import Identity
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee

SYNTHETIC_EVAL_SIZE = 256  # held-out problems of each synthetic task (test split: disjoint from train)


def make_task(name: str, source: str = "auto") -> Any:
    """The evaluation split of a task by its name on the command line."""
    builders: dict[str, Callable[[], Any]] = {
        "ARC-Easy": lambda: ARC("ARC-Easy", "test", source=source),
        "ARC-Challenge": lambda: ARC("ARC-Challenge", "test", source=source),
        "MMLU": lambda: MMLU("all", "test", source=source),
        "GSM8K": lambda: GSM8K("main", "test", source=source),
        "HumanEval": lambda: HumanEval(source=source),
        "SpellingBee": lambda: SpellingBee(size=SYNTHETIC_EVAL_SIZE, split="test"),
        "Arithmetic": lambda: Arithmetic(size=SYNTHETIC_EVAL_SIZE, split="test"),
    }
    if name not in builders:
        raise ValueError(f"unknown task {name!r}: expected some of {'|'.join(builders)}")
    return builders[name]()


def chat_val_mixture(source: str) -> Task:
    """Held-out conversations (test splits) of every task the chat stages train on: the one set
    on which MID and SFT val bpb are measured, so the two numbers compare."""
    return TaskMixture([
        SmolTalk("test", source=source),
        MMLU("all", "test", source=source, stop=5200),
        GSM8K("main", "test", source=source, stop=420),
        Arithmetic(size=200, split="test"),
        Identity(size=100, split="test"),
        SimpleSpelling(size=200, split="test"),
        SpellingBee(size=200, split="test"),
    ])
