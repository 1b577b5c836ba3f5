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


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a short list of floats over ranks (one collective), float64 on CPU."""
    import torch

    d = _dist()
    if not d or d.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if d.get_backend() == "nccl":
        t = t.cuda()
    d.all_reduce(t)
    return t.cpu().tolist()
