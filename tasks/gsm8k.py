"""GSM8K: grade-school math word problems, solved with calculator calls.

Hub: openai/gsm8k, configs main / socratic, splits train/test; fields `question` and `answer`.
An answer reads "She sold 48/2 = <<48/2=24>>24 clips ...\\n#### 72": each `<<expr=result>>`
annotation becomes a tool call, so the assistant learns to write the expression as a
<|python_start|> call and read the result from the tool's output:

    [{"type": "text", "text": "She sold 48/2 = "}, {"type": "python", "text": "48/2"},
     {"type": "python_output", "text": "24"}, {"type": "text", "text": "24 clips ...\\n#### 72"}]
"""

from __future__ import annotations

import re

from tasks.common import Conversation, HubTask, evaluate_final_answer

CALCULATOR_ANNOTATION = re.compile(r"(<<[^>]*>>)")


def parts_from_annotations(answer: str) -> list[dict[str, str]]:
    """Assistant parts from a solution with `<<expr=result>>` calculator annotations."""
    parts = []
    for piece in CALCULATOR_ANNOTATION.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, _, result = piece[2:-2].rpartition("=")
            if not expr:  # "<<12>>": no '=', nothing to compute
                raise ValueError(f"calculator annotation {piece!r} has no '=': expected <<expr=result>>")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def math_conversation(question: str, answer: str) -> Conversation:
    """User asks `question`; the assistant solves it with calculator calls (see module doc)."""
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts_from_annotations(answer)}]}


class GSM8K(HubTask):
    dataset_id = "openai/gsm8k"
    splits = {"main": ("train", "test"), "socratic": ("train", "test")}
    eval_type = "generative"

    def __init__(self, subset: str = "main", split: str = "test", source: str = "auto",
                 start: int = 0, stop: int | None = None, step: int = 1) -> None:
        super().__init__(subset, split, source, start, stop, step)

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        return math_conversation(row["question"], row["answer"])

    def evaluate(self, conversation: Conversation, assistant_response: str) -> bool:
        """Right when the response's first `#### N` equals the reference's as a number."""
        return evaluate_final_answer(conversation, assistant_response)
