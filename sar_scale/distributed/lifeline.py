"""Ranks die with their launcher.

torchrun (and DeepSpeed's launcher) start every rank in its own session/process group, so killing
the launcher's group (a scheduler's ``SIGKILL``, ``kill -9 -PGID``, a closed terminal) leaves the
ranks running as orphans: they keep training and keep writing and pruning checkpoints in a run
directory that a restarted job then shares with them. :func:`die_with_parent` closes that gap:

- Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` - the kernel kills this process when its parent dies;
- everywhere: a daemon thread that polls ``getppid()`` and kills this process once it changes (the
  parent died and the process was re-parented; also covers a parent that died before the prctl).

Only for processes started by a launcher: a plain ``sar-scale train`` in a shell must survive
``nohup`` and a closed terminal.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_armed_for: int | None = None  # the parent pid already watched (several Trainer.run in one process)


def _load_libc():
    if not sys.platform.startswith("linux"):
        return None
    try:  # loaded at import: safe to call later between fork and exec (no lookups, no allocation)
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux); False elsewhere."""
    if _LIBC is None:
        return False
    try:
        return _LIBC.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except AttributeError:
        return False


def die_with_parent(poll_s: float = 0.5, sig: int = signal.SIGKILL) -> int:
    """Make this process exit (``sig``) when its parent process dies; returns the parent pid watched."""
    global _armed_for
    ppid = os.getppid()
    if _armed_for == ppid:
        return ppid
    _armed_for = ppid
    armed = set_parent_death_signal(sig)
    if os.getppid() != ppid:  # parent died between the two getppid calls
        os.kill(os.getpid(), sig)

    def watch() -> None:
        ev = threading.Event()
        while not ev.wait(poll_s):
            if os.getppid() != ppid:
                os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
    logger.debug("this rank exits when its launcher (pid %d) dies (prctl %s, watchdog thread)", ppid,
                 "armed" if armed else "unavailable")
    return ppid


__all__ = ["die_with_parent", "set_parent_death_signal"]
