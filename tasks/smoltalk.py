"""SmolTalk: general chat conversations for supervised finetuning (no scoring).

Hub: HuggingFaceTB/smol-smoltalk, config default, splits train/test; each row has `messages`, a
list of {role, content} with an optional leading system message. Offline, SmolTalk is only a
SMALL STAND-IN: five handwritten conversations in the same schema (tasks/fixtures.py), enough
to exercise the SFT pipeline with no network, not to teach a model to chat.
"""

from __future__ import annotations

from tasks.common import Conversation, HubTask, validate_messages


class SmolTalk(HubTask):
    """Training-only (no `evaluate`)."""

    dataset_id = "HuggingFaceTB/smol-smoltalk"
    splits = {"default": ("train", "test")}
    eval_type = "generative"

    def __init__(self, split: str = "train", source: str = "auto",
                 start: int = 0, stop: int | None = None, step: int = 1) -> None:
        super().__init__("default", split, source, start, stop, step)

    def get_example(self, index: int) -> Conversation:
        messages = [{"role": m["role"], "content": m["content"]} for m in self.rows[index]["messages"]]
        try:
            validate_messages(messages)
        except ValueError as e:
            raise ValueError(f"SmolTalk {self.split} row {index}: {e}") from None
        return {"messages": messages}
