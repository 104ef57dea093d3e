"""Several processes: the process group, the collectives of a training step, failure detection
and traffic accounting.

Process group. `init_process_group` (called by common.compute_init under torchrun) gives every
collective a finite timeout, NANOCHAT_DIST_TIMEOUT seconds (default 300): a rank whose peer died
gets an error from the backend instead of waiting forever (gloo: at once when the peer's sockets
close; after the timeout when the peer is alive but stuck).

Failure. The training step's collectives go through the functions below. A backend error that
says the group is broken (a closed connection, a timeout) becomes `PeerLost`, whose message is one
line that common.run_main prints before exiting with status 1:

    error: rank 0 lost contact with the process group (a peer died?) during reduce of ...

instead of a hang or a page of C++ frames. torchrun, for its part, stops the other workers when
one exits non-zero. Errors that do not look like a lost peer (a shape mismatch, a bad argument)
propagate unchanged.

Traffic. Each collective counts the bytes one rank sends with a bandwidth-optimal (ring)
algorithm over w ranks, n = the tensor's bytes:

    all_reduce                  2 (w-1)/w · n      (a reduce-scatter, then an all-gather)
    reduce onto one rank          (w-1)/w · n
    broadcast from one rank       (w-1)/w · n

so DDP's all-reduce of a gradient and ZeRO's reduce onto its owner plus the owner's broadcast of
the updated parameter cost the same; what MoleGrad saves is the size of what is reduced.
`record_traffic()` collects, while active, every collective with a tag saying what it carried.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from nanochat.config import UserError

TIMEOUT_ENV = "NANOCHAT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
SUM, AVG = dist.ReduceOp.SUM, dist.ReduceOp.AVG
# phrases of gloo / NCCL / c10d errors that mean the group is broken, not that the call was wrong
PEER_LOST_SIGNS = ("timed out", "timeout", "connection", "closed by peer", "reset by peer", "broken pipe",
                   "socket", "communicator was aborted", "watchdog")


def timeout_seconds() -> float:
    """NANOCHAT_DIST_TIMEOUT as seconds > 0 (default 300)."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0")
    return value


def init_process_group(backend: str, device: torch.device | None = None, **kwargs: Any) -> None:
    """dist.init_process_group with the NANOCHAT_DIST_TIMEOUT timeout (torchrun's env:// unless
    kwargs say otherwise: init_method, rank, world_size)."""
    timeout = timedelta(seconds=timeout_seconds())
    dist.init_process_group(backend=backend, timeout=timeout, device_id=device, **kwargs)


def is_distributed() -> bool:
    """A process group with more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


# ---------------------------------------------------------------------------------------------
# traffic accounting

@dataclass
class Traffic:
    """The collectives this rank called while recording: (tag, op, shape, bytes sent)."""

    events: list[tuple[str, str, tuple[int, ...], int]] = field(default_factory=list)

    def bytes_by_tag(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for tag, _, _, nbytes in self.events:
            totals[tag] = totals.get(tag, 0) + nbytes
        return totals

    @property
    def total_bytes(self) -> int:
        return sum(nbytes for *_, nbytes in self.events)

    def shapes(self, tag: str | None = None) -> set[tuple[int, ...]]:
        return {shape for event_tag, _, shape, _ in self.events if tag is None or event_tag == tag}


_recorders: list[Traffic] = []  # the active record_traffic() blocks, innermost last


@contextlib.contextmanager
def record_traffic() -> Iterator[Traffic]:
    """Counts every collective called through this module inside the block."""
    traffic = Traffic()
    _recorders.append(traffic)
    try:
        yield traffic
    finally:
        _recorders.remove(traffic)


RING_FACTOR = {"all_reduce": 2, "reduce": 1, "broadcast": 1}  # times (w-1)/w · n


def _count(tag: str, op: str, tensor: torch.Tensor) -> None:
    if not _recorders:
        return
    w = dist.get_world_size()
    nbytes = RING_FACTOR[op] * (w - 1) * tensor.numel() * tensor.element_size() // w
    for traffic in _recorders:
        traffic.events.append((tag, op, tuple(tensor.shape), nbytes))


# ---------------------------------------------------------------------------------------------
# collectives: asynchronous, counted, and one clear error when a peer is gone

class PeerLost(UserError, RuntimeError):
    """A collective failed because another rank died or stopped answering; the message is one line."""


@contextlib.contextmanager
def _peer_loss_raises(what: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as e:  # gloo, NCCL and c10d errors are RuntimeErrors (DistError included)
        text = str(e).strip()
        if not any(sign in text.lower() for sign in PEER_LOST_SIGNS):
            raise
        cause = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0])  # drop "[.../pair.cc:553] "
        cause = cause.split(". ")[0].rstrip(".")  # the backend's first sentence; the rest is advice
        raise PeerLost(f"rank {dist.get_rank()} lost contact with the process group (a peer died?) during {what}: "
                       f"{cause} (collective timeout {timeout_seconds():g} s, set by {TIMEOUT_ENV})") from e


class Pending:
    """An asynchronous collective in flight; wait() before reading its tensor."""

    def __init__(self, work: Any, what: str) -> None:
        self.work, self.what = work, what

    def wait(self) -> None:
        with _peer_loss_raises(self.what):
            self.work.wait()


def wait_all(pending: list[Pending]) -> None:
    for item in pending:
        item.wait()


def _describe(op: str, tag: str, tensor: torch.Tensor) -> str:
    return f"{op} of {tag} {tuple(tensor.shape)}"


def all_reduce(tensor: torch.Tensor, tag: str, op: dist.ReduceOp.RedOpType = SUM) -> Pending:
    """In place on every rank; op SUM or AVG."""
    what = _describe("all_reduce", tag, tensor)
    _count(tag, "all_reduce", tensor)
    with _peer_loss_raises(what):
        return Pending(dist.all_reduce(tensor, op=op, async_op=True), what)


def reduce(tensor: torch.Tensor, dst: int, tag: str, op: dist.ReduceOp.RedOpType = SUM) -> Pending:
    """The reduction (op SUM or AVG) over ranks lands in `tensor` on rank `dst`; other ranks'
    tensors may be overwritten with partial results."""
    what = _describe("reduce", tag, tensor)
    _count(tag, "reduce", tensor)
    with _peer_loss_raises(what):
        return Pending(dist.reduce(tensor, dst=dst, op=op, async_op=True), what)


def broadcast(tensor: torch.Tensor, src: int, tag: str) -> Pending:
    """Rank `src`'s values into `tensor` on every rank."""
    what = _describe("broadcast", tag, tensor)
    _count(tag, "broadcast", tensor)
    with _peer_loss_raises(what):
        return Pending(dist.broadcast(tensor, src=src, async_op=True), what)


def barrier(what: str = "barrier") -> None:
    with _peer_loss_raises(what):
        dist.barrier()
