"""ARC (AI2 Reasoning Challenge): grade-school science multiple choice, Easy and Challenge sets.

Hub: allenai/ai2_arc, configs ARC-Easy / ARC-Challenge, splits train/validation/test. Rows have
`question`, `choices.text`, `choices.label` and `answerKey`. Labels are usually A-D but some
questions have 3 or 5 choices or numeric labels 1-4; the labels are used as the letters as-is.
"""

from __future__ import annotations

from tasks.common import Conversation, MultipleChoiceTask, mc_conversation

SPLITS = ("train", "validation", "test")


class ARC(MultipleChoiceTask):
    dataset_id = "allenai/ai2_arc"
    splits = {"ARC-Easy": SPLITS, "ARC-Challenge": SPLITS}

    def __init__(self, subset: str = "ARC-Easy", split: str = "test", source: str = "auto",
                 start: int = 0, stop: int | None = None, step: int = 1) -> None:
        super().__init__(subset, split, source, start, stop, step)

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        return mc_conversation(row["question"], list(row["choices"]["label"]), list(row["choices"]["text"]), row["answerKey"])
