"""Pretraining batches: stream documents from parquet shards, tokenize, pack into (B, T) rows.

The token stream is the concatenation of documents, each prefixed with <|bos|>. A batch takes
B*T + 1 consecutive tokens: inputs are the first B*T, targets the last B*T (shifted by one); the
next batch starts where this one's targets end, so no token is skipped.

Exact resume: the loader works one parquet row group at a time. Its state is the position of the
oldest row group still buffered, how many of that row group's tokens were already consumed, and
the epoch; `DataLoader(..., state=saved)` re-reads that row group, re-tokenizes it (deterministic)
and skips the consumed tokens, so the next batch equals the one an uninterrupted run would get.

Checked first: the constructor runs nanochat.dataset.verify_shards (every footer; size and
sha256 against the manifest), so a truncated or corrupted shard stops the run before step 1.

Distributed: row groups are dealt round-robin to ranks by nanochat.dataset.iter_row_groups, so
ranks read disjoint data and each rank keeps its own state.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterator

import torch

from nanochat.dataset import iter_row_groups, verify_shards


class DataLoader:
    def __init__(
        self,
        tokenizer: Any,
        batch_size: int,
        seq_len: int,
        split: str,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        state: dict[str, int] | None = None,
        num_threads: int = 4,
        data_dir: Any = None,
        loop: bool | None = None,
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        verify_shards(data_dir)
        self.tokenizer = tokenizer
        self.bos = tokenizer.get_bos_token_id()
        self.B, self.T = batch_size, seq_len
        self.split = split
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.num_threads = num_threads
        self.data_dir = data_dir
        self.loop = (split == "train") if loop is None else loop  # train repeats epochs, val is one pass
        state = state or {"epoch": 0, "file_idx": 0, "rg_idx": 0, "offset": 0}
        self.epoch = state["epoch"]
        # buffered row groups: (epoch, position, tokens), `offset` tokens of the first already used;
        # the first one is kept even when fully used so that it always names the resume point
        self._buffer: deque[tuple[int, tuple[int, int], list[int]]] = deque()
        self._offset = state["offset"]
        self._buffered_tokens = 0
        self._row_groups = self._open(start=(state["file_idx"], state["rg_idx"]))
        self._initial_state = dict(state)

    def _open(self, start: tuple[int, int]) -> Iterator[tuple[list[str], tuple[int, int]]]:
        return iter_row_groups(self.split, start=start, rank=self.rank, world_size=self.world_size, data_dir=self.data_dir)

    def _fill(self, needed: int) -> None:
        """Tokenize row groups until at least `needed` unconsumed tokens are buffered."""
        while self._buffered_tokens - self._offset < needed:
            try:
                texts, position = next(self._row_groups)
            except StopIteration:
                if not self.loop:
                    raise
                self.epoch += 1
                self._row_groups = self._open(start=(0, 0))
                texts, position = next(self._row_groups)  # an empty split raises here, never spins
            tokens = [t for doc in self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.num_threads) for t in doc]
            self._buffer.append((self.epoch, position, tokens))
            self._buffered_tokens += len(tokens)

    def _take(self, count: int, advance: int) -> list[int]:
        """The next `count` tokens; the stream moves forward by `advance` (<= count)."""
        self._fill(count)
        out: list[int] = []
        offset = self._offset
        for _, _, tokens in self._buffer:
            out.extend(tokens[offset : offset + count - len(out)])
            offset = 0
            if len(out) == count:
                break
        self._offset += advance
        while len(self._buffer) > 1 and self._offset >= len(self._buffer[0][2]):
            _, _, tokens = self._buffer.popleft()
            self._offset -= len(tokens)
            self._buffered_tokens -= len(tokens)
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both (B, T) int64 on the device."""
        n = self.B * self.T
        flat = torch.tensor(self._take(n + 1, advance=n), dtype=torch.long)
        if self.device.type == "cuda":
            flat = flat.pin_memory().to(self.device, non_blocking=True)
        else:
            flat = flat.to(self.device)
        return flat[:-1].view(self.B, self.T), flat[1:].view(self.B, self.T)

    def __iter__(self) -> "DataLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """Where the next batch starts: resume with DataLoader(..., state=this)."""
        if not self._buffer:
            return dict(self._initial_state)
        epoch, (file_idx, rg_idx), _ = self._buffer[0]
        return {"epoch": epoch, "file_idx": file_idx, "rg_idx": rg_idx, "offset": self._offset}
