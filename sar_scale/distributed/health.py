"""Rank health: each rank's status file (state, step, heartbeat) and, when a collective fails, which
peers look dead - so the error names the rank that died instead of "timeout" on every survivor."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from sar_scale.distributed.env import DistEnv
from sar_scale.utils.atomic import atomic_write
from sar_scale.utils.procs import pid_alive


class RankStatus:
    """Per-rank status file (state, step, heartbeat): lets a survivor name the rank that died."""

    # At most one rewrite a second per rank: a survivor names the dead rank's step at most ~1 s stale,
    # while a large job (thousands of ranks on a shared file system) stays at a rename per rank-second.
    def __init__(self, run_dir: Path, denv: DistEnv, every_s: float = 1.0):
        self.path = run_dir / "status" / f"rank{denv.rank}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.denv, self.every_s, self._last, self._state = denv, every_s, 0.0, ""
        self.base = {"rank": denv.rank, "host": socket.gethostname(), "pid": os.getpid()}

    def write(self, state: str, step: int, force: bool = False, **extra: Any) -> None:
        now = time.time()
        if not force and state == self._state and now - self._last < self.every_s:
            return
        self._last, self._state = now, state
        # no fsync: a heartbeat a second, read by live peers, not a record that must survive a crash
        atomic_write(self.path, json.dumps({**self.base, "state": state, "step": step, "time": now, **extra}),
                     fsync=False)


def diagnose_peers(run_dir: Path, world: int, me: int) -> str:
    """Which other ranks look dead (process gone on this host, failed, or silent): for error messages."""
    notes = []
    host = socket.gethostname()
    for r in range(world):
        if r == me:
            continue
        p = run_dir / "status" / f"rank{r}.json"
        try:
            st = json.loads(p.read_text())
        except (OSError, ValueError):
            notes.append(f"rank {r}: no status file")
            continue
        if st.get("state") == "failed":
            notes.append(f"rank {r}: failed ({st.get('error', '?')})")
        elif st.get("state") in ("starting", "running") and st.get("host") == host:
            if not pid_alive(int(st["pid"])):
                notes.append(f"rank {r}: process {st['pid']} on {host} is gone (killed?) at step {st.get('step')}")
        elif st.get("state") in ("starting", "running"):
            notes.append(f"rank {r}: last heartbeat {time.time() - st.get('time', 0):.0f}s ago on {st.get('host')}")
    return "; ".join(notes)


__all__ = ["RankStatus", "diagnose_peers"]
