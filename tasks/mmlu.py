"""MMLU: multiple choice over 57 subjects, four choices each.

Hub: cais/mmlu. Config `all` has splits test/validation/dev; config `auxiliary_train` has split
train, whose rows nest the fields under a `train` column. Fields: `question`, `subject`,
`choices` (4 strings), `answer` (int 0-3).
"""

from __future__ import annotations

from tasks.common import LETTERS, Conversation, MultipleChoiceTask, mc_conversation

class MMLU(MultipleChoiceTask):
    dataset_id = "cais/mmlu"
    splits = {"all": ("test", "validation", "dev"), "auxiliary_train": ("train",)}

    def __init__(self, subset: str = "all", split: str = "test", source: str = "auto",
                 start: int = 0, stop: int | None = None, step: int = 1) -> None:
        super().__init__(subset, split, source, start, stop, step)
        if subset == "auxiliary_train":
            self.rows = [row["train"] for row in self.rows]

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        choices = list(row["choices"])
        letters = list(LETTERS[: len(choices)])
        return mc_conversation(row["question"], letters, choices, letters[row["answer"]], subject=row["subject"])
