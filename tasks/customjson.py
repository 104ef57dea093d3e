"""Conversations from your own JSONL file, one conversation per line.

Each line is either a list of messages or {"messages": [...]}; a message is {"role", "content"}
with an optional leading system message, then user/assistant alternating from the user and
ending with the assistant. Assistant content may be a string or a list of parts
({"type": "text"|"python"|"python_output", "text": ...}). Blank lines are skipped. Errors name
the file and line number.
"""

from __future__ import annotations

from pathlib import Path

from nanochat.common import read_jsonl
from tasks.common import Conversation, Task, validate_messages


def read_conversations(path: Path) -> list[Conversation]:
    conversations = []
    for line_number, record in read_jsonl(path):
        messages = record.get("messages") if isinstance(record, dict) else record
        try:
            validate_messages(messages)
        except ValueError as e:
            raise ValueError(f"{path}:{line_number}: {e}") from None
        conversations.append({"messages": messages})
    if not conversations:
        raise ValueError(f"{path}: no conversations (the file is empty)")
    return conversations


class CustomJSON(Task):
    eval_type = "generative"

    def __init__(self, path: str | Path, start: int = 0, stop: int | None = None, step: int = 1) -> None:
        super().__init__(start, stop, step)
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"CustomJSON: no file at {self.path}")
        self.conversations = read_conversations(self.path)

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> Conversation:
        return {"messages": [dict(message) for message in self.conversations[index]["messages"]]}
