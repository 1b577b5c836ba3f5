"""How many CPUs this process may use."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask on Linux (a container's or taskset's limit),
    every CPU where there is no such API (macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


__all__ = ["usable_cpus"]
