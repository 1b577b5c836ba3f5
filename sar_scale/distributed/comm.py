"""Thin collectives that also work without a process group (a world of one, CLI tools, tests)."""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def barrier() -> None:
    d = _dist()
    if d and d.get_world_size() > 1:
        d.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s object on every rank (pickled over the process group: our own processes only)."""
    d = _dist()
    if not d or d.get_world_size() == 1:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    d = _dist()
    if not d or d.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


class PendingSum:
    """A sum over ranks that was started earlier and is read when the numbers are needed.

    ``result()`` waits for the collective and makes the one device->host read; until then the caller
    goes on queueing work (the next training step), so neither the collective nor the read stalls it.
    """

    def __init__(self, t, work=None):
        self._t, self._work = t, work

    def result(self) -> list[float]:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._t.tolist()


def start_sum(t) -> PendingSum:
    """Start an all-reduce (sum) of a small tensor without waiting for it (``async_op``).

    The tensor is reduced in place: pass one nothing else writes to. NCCL needs it on the GPU and gloo on
    the CPU; it is moved only when it sits on the wrong side.
    """
    d = _dist()
    if not d or d.get_world_size() == 1:
        return PendingSum(t)
    if d.get_backend() == "nccl":
        t = t if t.is_cuda else t.cuda()
    elif t.is_cuda:
        t = t.cpu()
    return PendingSum(t, d.all_reduce(t, async_op=True))


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a short list of floats over ranks (one collective), float64."""
    import torch

    return start_sum(torch.tensor(values, dtype=torch.float64)).result()
