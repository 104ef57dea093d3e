"""The chat evaluation tasks by the names chat_eval takes on its command line (-a/--tasks).

    task = make_task("GSM8K", source="offline")
"""

from __future__ import annotations

from typing import Any, Callable

from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spellingbee import SpellingBee


def make_task(name: str, source: str = "auto") -> Any:
    """The evaluation split of a task by its name on the command line."""
    builders: dict[str, Callable[[], Any]] = {
        "ARC-Easy": lambda: ARC("ARC-Easy", "test", source=source),
        "ARC-Challenge": lambda: ARC("ARC-Challenge", "test", source=source),
        "MMLU": lambda: MMLU("all", "test", source=source),
        "GSM8K": lambda: GSM8K("main", "test", source=source),
        "HumanEval": lambda: HumanEval(source=source),
        "SpellingBee": lambda: SpellingBee(size=256, split="test"),
    }
    if name not in builders:
        raise ValueError(f"unknown task {name!r}: expected some of {'|'.join(builders)}")
    return builders[name]()
