"""Rank health (status files, naming dead peers) and distributed init clearing a stale JIT build lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from sar_scale.distributed.env import DistEnv
from sar_scale.distributed.health import RankStatus, diagnose_peers
from sar_scale.utils.procs import pid_alive


def test_status_files_name_the_dead_failed_and_missing_peers(tmp_path):
    RankStatus(tmp_path, DistEnv(rank=0, world_size=4)).write("running", 7, force=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not pid_alive(dead.pid) and pid_alive(os.getpid())
    s1 = RankStatus(tmp_path, DistEnv(rank=1, world_size=4))
    s1.base["pid"] = dead.pid  # rank 1 "ran" in a process that is gone now
    s1.write("running", 5, force=True)
    RankStatus(tmp_path, DistEnv(rank=2, world_size=4)).write("failed", 3, force=True, error="OOM")
    assert json.loads((tmp_path / "status" / "rank2.json").read_text())["error"] == "OOM"
    notes = diagnose_peers(tmp_path, world=4, me=0)
    assert f"rank 1: process {dead.pid}" in notes and "at step 5" in notes
    assert "rank 2: failed (OOM)" in notes and "rank 3: no status file" in notes and "rank 0" not in notes


def test_init_distributed_clears_stale_build_locks_before_deepspeed_builds(tmp_path, monkeypatch):
    """`sar-scale train` itself must not hang on a lock left by a killed DeepSpeed JIT build: the
    cleanup runs in init_distributed, before DeepSpeed's first op build (the real extension cache
    is used, so nothing is rebuilt; the stale lock lives in a scratch folder)."""
    import torch.distributed as dist

    from sar_scale.distributed import init as dinit

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    real, seen = dinit.clear_stale_build_locks, []

    def cleanup(max_age_s: float = dinit.STALE_LOCK_S, root=None) -> list:
        seen.append(dist.is_initialized())
        return real(max_age_s, root=tmp_path)

    monkeypatch.setattr(dinit, "clear_stale_build_locks", cleanup)
    before = dist.is_initialized()  # another test of this session may have left a group behind
    dinit.init_distributed("gloo", "cpu", 30)
    try:
        assert seen == [before] and not lock.exists()
    finally:
        if not before:
            dinit.destroy_distributed()
