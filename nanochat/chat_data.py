"""Chat training data: conversations rendered into (B, T) training batches, packed or padded.

A conversation is rendered by the tokenizer into (ids, mask), mask 1 on what the assistant says
(its text, its <|python_start|>calls<|python_end|> and <|assistant_end|>), 0 elsewhere (the
user, <|bos|>, and the tool's <|output_start|>output<|output_end|>). A row of n ids trains on
n - 1 positions:

    inputs[i]  = ids[i]
    targets[i] = ids[i + 1] where mask[i + 1] == 1, else -1 (ignored by the loss)

Two ways to make (B, T) batches (`ChatBatches`):
- packed (mid_train): every row is exactly T + 1 tokens of whole conversations, each starting
  with its own <|bos|>. Rows are filled best-fit from a small buffer of rendered conversations
  (the longest that still fits, until none does); what is left of the row is padding (<|bos|>
  in, -1 out). A conversation longer than T + 1 tokens is truncated to one full row.
- padded (chat_sft): one conversation per row, truncated to T + 1 tokens; a batch is as long as
  its longest row, shorter rows are padded (<|bos|> in, -1 out).
A conversation with nothing to train on within T + 1 tokens (a long prompt truncated before the
reply) is skipped: it would only add a loss of 0/0.

Distributed: rank r takes the mixture's examples r, r + world_size, r + 2 * world_size, ...
Exact resume: `state_dict()` is {"epoch", "position" (next of this rank's examples), "pending"
(mixture indices rendered but not yet placed in a row)}; rendering is deterministic, so
`ChatBatches(..., state=saved)` yields the same next batch an uninterrupted run would.

A mixture is anything with len() and [i] -> conversation dict (tasks.common.TaskMixture);
the training loop that consumes these batches is nanochat/chat_train.py.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

import torch

from nanochat.tokenizer import Tokenizer

class Mixture(Protocol):
    """What batching needs of a task mixture: its size and its conversations by index."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


PACKED, PADDED = "packed", "padded"
MODES = (PACKED, PADDED)
PACK_BUFFER = 32  # rendered conversations a packed row chooses from (best fit)
ESTIMATE_SAMPLES = 1000  # conversations rendered to estimate the length of an epoch in packed rows


# ---------------------------------------------------------------------------------------------
# rendering

def render_for_training(tokenizer: Tokenizer, conversation: dict[str, Any], max_tokens: int) -> tuple[list[int], list[int]] | None:
    """(ids, mask) of a conversation truncated to `max_tokens`, or None when no target is trained
    (mask[1:] all 0: mask[0] is <|bos|>, which is never a target)."""
    ids, mask = tokenizer.render_conversation(conversation, max_tokens=max_tokens)
    return (ids, mask) if any(mask[1:]) else None


def rows_to_batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both (B, L - 1) int64, from B rows of (ids, mask) padded to the longest, L.
    targets[b, i] = ids[b][i + 1] where mask[b][i + 1] == 1, else -1; padding is never a target."""
    length = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([row_ids + [pad_id] * (length - len(row_ids)) for row_ids, _ in rows], dtype=torch.long)  # (B, L)
    mask = torch.tensor([row_mask + [0] * (length - len(row_mask)) for _, row_mask in rows], dtype=torch.bool)  # (B, L)
    return ids[:, :-1], ids[:, 1:].masked_fill(~mask[:, 1:], -1)


# ---------------------------------------------------------------------------------------------
# batches

class ChatBatches:
    """(inputs, targets) batches of a task mixture's conversations; see the module docstring."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        mixture: Mixture,
        mode: str,
        batch_size: int,
        seq_len: int,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        state: dict[str, Any] | None = None,
        loop: bool = True,
        pack_buffer: int = PACK_BUFFER,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {'|'.join(MODES)}, got {mode!r}")
        if batch_size < 1 or seq_len < 1 or pack_buffer < 1:
            raise ValueError(f"batch_size, seq_len and pack_buffer must be >= 1, got {batch_size}, {seq_len}, {pack_buffer}")
        self.tokenizer, self.mixture, self.mode = tokenizer, mixture, mode
        self.B, self.T = batch_size, seq_len
        self.device = torch.device(device)
        self.loop, self.pack_buffer = loop, pack_buffer
        self.pad_id = tokenizer.get_bos_token_id()
        self.indices = range(rank, len(mixture), world_size)  # this rank's examples, in mixture order
        if len(self.indices) == 0:
            raise ValueError(f"rank {rank} of {world_size} gets no examples from a mixture of {len(mixture)}")
        state = state or {"epoch": 0, "position": 0, "pending": []}
        self.epoch, self.position = state["epoch"], state["position"]
        # packed: rendered conversations waiting for a row, (mixture index, ids, mask)
        self.pending = [(index, *self._render(index)) for index in state["pending"]]
        self.tokens_served = 0  # input positions (B * L) yielded, padding included: the compute done

    def _render(self, index: int) -> tuple[list[int], list[int]] | None:
        return render_for_training(self.tokenizer, self.mixture[index], self.T + 1)

    def _next_example(self) -> tuple[int, list[int], list[int]]:
        """The next of this rank's conversations with something to train on; StopIteration at the
        end of the pass when not looping."""
        skipped = 0
        while True:
            if self.position == len(self.indices):
                if not self.loop:
                    raise StopIteration
                self.epoch, self.position = self.epoch + 1, 0
            index = self.indices[self.position]
            self.position += 1
            rendered = self._render(index)
            if rendered is not None:
                return index, *rendered
            skipped += 1
            if skipped >= len(self.indices):
                raise ValueError(f"no conversation of this rank's {len(self.indices)} has an assistant token within "
                                 f"the first {self.T + 1} tokens: raise --max_seq_len")

    def _packed_row(self) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []
        room = self.T + 1
        while room > 0:
            while len(self.pending) < self.pack_buffer:
                try:
                    self.pending.append(self._next_example())
                except StopIteration:
                    break
            fitting = [j for j, (_, conv_ids, _) in enumerate(self.pending) if len(conv_ids) <= room]
            if not fitting:
                break
            best = max(fitting, key=lambda j: len(self.pending[j][1]))  # longest that fits; ties: oldest
            _, conv_ids, conv_mask = self.pending.pop(best)
            ids += conv_ids
            mask += conv_mask
            room -= len(conv_ids)
        if room == self.T + 1:
            raise StopIteration  # nothing left (only when not looping)
        return ids + [self.pad_id] * room, mask + [0] * room

    def _next_row(self) -> tuple[list[int], list[int]]:
        if self.mode == PACKED:
            return self._packed_row()
        _, ids, mask = self._next_example()
        return ids, mask

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), (B, T) when packed, (B, L <= T) when padded; at the end of a pass that
        does not loop, the last batch may have fewer rows."""
        rows = []
        for _ in range(self.B):
            try:
                rows.append(self._next_row())
            except StopIteration:
                if not rows:
                    raise
                break
        inputs, targets = rows_to_batch(rows, self.pad_id)
        self.tokens_served += inputs.numel()
        non_blocking = self.device.type == "cuda"
        return inputs.to(self.device, non_blocking=non_blocking), targets.to(self.device, non_blocking=non_blocking)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch starts: resume with ChatBatches(..., state=this)."""
        return {"epoch": self.epoch, "position": self.position, "pending": [index for index, _, _ in self.pending]}


def epoch_steps(tokenizer: Tokenizer, mixture: Mixture, mode: str, seq_len: int, rows_per_step: int) -> int:
    """Optimizer steps in about one pass over `mixture` (at least 1).

    padded: one conversation per row, so len(mixture) // rows_per_step.
    packed: the mean length of up to ESTIMATE_SAMPLES evenly spaced conversations (as rendered,
    truncated, skipped) times len(mixture), over the tokens of a step; best-fit padding makes the
    true pass a few percent longer.
    """
    if mode == PADDED:
        return max(1, len(mixture) // rows_per_step)
    picks = range(0, len(mixture), max(1, len(mixture) // ESTIMATE_SAMPLES))
    lengths = [len(r[0]) if (r := render_for_training(tokenizer, mixture[i], seq_len + 1)) else 0 for i in picks]
    tokens = sum(lengths) / len(lengths) * len(mixture)
    return max(1, round(tokens / (rows_per_step * (seq_len + 1))))
