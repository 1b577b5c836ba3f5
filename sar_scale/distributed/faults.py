"""Deterministic fault injection for the reliability tests (promises 1 and 9 of docs/reliability.md).

``SAR_SCALE_FAULT="ACTION:POINT:step=N[:rank=R]"`` (several separated by ``;``) makes the matching
rank really die at a named point: ``kill`` sends itself SIGKILL, ``exit`` calls ``os._exit(3)``,
``hang`` sleeps forever (a stuck rank), ``raise`` raises RuntimeError; ``nan`` does not stop the rank but
makes its loss of step N NaN (point ``loss``: a diverged step). Points used by the trainer:
``after_step`` (optimizer step N finished), ``ckpt_files_written`` (checkpoint N's files are on disk,
its COMPLETE marker is not), ``loss`` (the loss of step N, before its backward). Unset in normal runs;
parsing errors name the bad entry.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

ENV = "SAR_SCALE_FAULT"
ACTIONS = ("kill", "exit", "hang", "raise", "nan")


@dataclass(frozen=True)
class Fault:
    action: str
    point: str
    step: int
    rank: int | None


def parse_faults(spec: str | None) -> list[Fault]:
    out = []
    for entry in (spec or "").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) < 3 or parts[0] not in ACTIONS:
            raise ValueError(f"{ENV} entry {entry!r}: want ACTION:POINT:step=N[:rank=R], ACTION in {ACTIONS}")
        kv = {}
        for p in parts[2:]:
            k, _, v = p.partition("=")
            if k not in ("step", "rank") or not v.lstrip("-").isdigit():
                raise ValueError(f"{ENV} entry {entry!r}: bad field {p!r} (allowed: step=N, rank=R)")
            kv[k] = int(v)
        if "step" not in kv:
            raise ValueError(f"{ENV} entry {entry!r}: step=N is required")
        out.append(Fault(parts[0], parts[1], kv["step"], kv.get("rank")))
    return out


def _here(point: str, step: int) -> tuple[list[Fault], int]:
    """(faults configured for ``point``/``step`` on this rank, this rank); none in normal runs."""
    spec = os.environ.get(ENV)
    if not spec:
        return [], 0
    rank = int(os.environ.get("RANK", "0"))
    return [f for f in parse_faults(spec)
            if f.point == point and f.step == step and (f.rank is None or f.rank == rank)], rank


def maybe_fire(point: str, step: int) -> None:
    """Carry out a configured fault at ``point``/``step`` on this rank, if any."""
    faults, rank = _here(point, step)
    for f in faults:
        if f.action == "nan":  # not a way to die: see poisoned()
            continue
        logger.error("fault injection: %s at %s step %d on rank %d", f.action, point, step, rank)
        for h in logging.getLogger().handlers:
            h.flush()
        if f.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif f.action == "exit":
            os._exit(3)
        elif f.action == "hang":
            while True:
                time.sleep(3600)
        else:
            raise RuntimeError(f"fault injection at {point} step {step} on rank {rank}")


def poisoned(point: str, step: int) -> bool:
    """Whether a ``nan`` fault is configured for ``point``/``step`` on this rank (the caller makes its value NaN)."""
    faults, rank = _here(point, step)
    if any(f.action == "nan" for f in faults):
        logger.error("fault injection: NaN loss at %s step %d on rank %d", point, step, rank)
        return True
    return False
