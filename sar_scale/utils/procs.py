"""Stopping a process group: what the demo stages, the dashboard's server, the local cluster
backend and the tests' servers all do to a child started with ``start_new_session=True``."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable


def stop_process_group(target: subprocess.Popen | int, grace_s: float = 30.0,
                       alive: Callable[[], bool] | None = None) -> bool:
    """SIGTERM the group led by ``target`` (a Popen, or a process-group id), wait up to ``grace_s``
    for it to end, then SIGKILL it. ``alive`` says whether a pgid target still runs (default: any
    member of the group exists). Returns True when SIGKILL was needed."""
    proc = target if isinstance(target, subprocess.Popen) else None
    pgid = proc.pid if proc is not None else int(target)
    if proc is not None and proc.poll() is not None:
        return False

    def signal_group(sig: int) -> bool:  # False: no member of the group is left
        try:
            os.killpg(pgid, sig)
            return True
        except ProcessLookupError:
            return False

    def running() -> bool:
        return alive() if alive is not None else signal_group(0)

    if not signal_group(signal.SIGTERM):
        return False
    if proc is not None:
        try:
            proc.wait(grace_s)
            return False
        except subprocess.TimeoutExpired:
            pass
    else:
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and running():
            time.sleep(0.2)
        if not running():
            return False
    if not signal_group(signal.SIGKILL):
        return False
    if proc is not None:
        proc.wait(10)
    return True


def pid_alive(pid: int, create_time: float | None = None) -> bool:
    """The process exists, is not a zombie (killed, not yet reaped by its parent) and, given its
    ``create_time``, is the same process (not a recycled pid)."""
    import psutil

    try:
        p = psutil.Process(int(pid))
        if create_time is not None and abs(p.create_time() - float(create_time)) >= 1.0:
            return False
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's live process
        return True


__all__ = ["pid_alive", "stop_process_group"]
