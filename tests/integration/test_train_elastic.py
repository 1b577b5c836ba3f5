"""Elastic exact resume (another world size, another node layout) and one writer per run directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sar_scale.training.debug_data import write_debug_shards
from sar_scale.utils.net import free_port
from tests.integration.train_launch import (
    REPO,
    base_config,
    keys_per_step,
    logs,
    metrics,
    rank_env,
    spawn,
    train_argv,
    wait,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_debug_shards(root, num_samples=40, resolutions=(64,), samples_per_shard=8, seed=5)
    return root


def _torchrun(cfg_path: Path, log: Path, nnodes: int, nproc: int, extra_env: dict[str, str] | None = None,
              new_session: bool = False) -> list[subprocess.Popen]:
    """``nnodes`` torchrun agents of ``nproc`` ranks each (static rendezvous on 127.0.0.1)."""
    port = free_port()
    procs = []
    for node in range(nnodes):
        env = rank_env(0, 1, port, extra_env)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k)
        f = open(f"{log}.node{node}.log", "wb")  # noqa: SIM115 - closed by wait()
        procs.append(subprocess.Popen(
            [TORCHRUN, f"--nnodes={nnodes}", f"--node_rank={node}", f"--nproc_per_node={nproc}",
             "--master_addr=127.0.0.1", f"--master_port={port}", *train_argv(cfg_path)],
            env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=new_session))
        procs[-1]._log = f  # type: ignore[attr-defined]
    return procs


def test_elastic_resume_across_world_sizes_and_node_layouts(shards, tmp_path):
    """Reference: 2 ranks, 10 steps, global batch 4 micro-batches. The same run, SIGKILLed after every
    few steps and resumed on another shape each time: 2 nodes x 1 rank -> 1 node x 2 ranks -> 1 rank
    (grad_accum 2 -> 4, optimizer resharded) -> 2 ranks. Every step's loss equals the reference's within
    1e-4 relative and every global step reads the same samples."""
    stages = [{"name": "s64", "resolution": 64, "steps": 10, "micro_batch": 2, "grad_accum": 2}]
    cfgs = {}
    for name in ("ref", "elastic"):
        cfg = base_config(tmp_path / name, shards, curriculum={"stages": stages},
                          deepspeed={"zero_stage": 2, "timeout_s": 60},
                          checkpoint={"every_steps": 2, "keep_last": 2})
        cfgs[name] = tmp_path / f"{name}.yaml"
        cfgs[name].write_text(yaml.safe_dump(cfg))
    lg = tmp_path / "logs"
    assert wait(spawn(2, train_argv(cfgs["ref"]), lg, name="ref"), 300) == [0, 0], logs(lg, "ref")

    def kill_at(step: int) -> dict[str, str]:
        return {"SAR_SCALE_FAULT": f"kill:after_step:step={step}"}

    # 2 nodes x 1 rank, killed after step 3 (checkpoint at 2)
    codes = wait(_torchrun(cfgs["elastic"], lg / "n2", 2, 1, kill_at(3)), 300)
    assert all(c != 0 for c in codes)
    # 1 node x 2 ranks resumes, killed after step 5 (checkpoint at 4)
    codes = wait(_torchrun(cfgs["elastic"], lg / "n1", 1, 2, kill_at(5)), 300)
    assert all(c != 0 for c in codes)
    # 1 rank resumes (grad_accum 4, optimizer resharded), killed after step 7 (checkpoint at 6)
    codes = wait(spawn(1, train_argv(cfgs["elastic"]), lg, kill_at(7), name="w1"), 300)
    assert all(c != 0 for c in codes)
    # 2 ranks resume and finish
    assert wait(spawn(2, train_argv(cfgs["elastic"]), lg, name="w2"), 300) == [0, 0], logs(lg, "w2")

    log0 = (tmp_path / "elastic" / "logs" / "rank0.log").read_text()
    assert "grad_accum 2 -> 4 on 1 ranks keeps the checkpoint's global batch of 4" in log0
    assert "world size 2 -> 1" in log0 and "world size 1 -> 2" in log0 and "universal checkpoint" in log0
    ref, got = metrics(tmp_path / "ref"), metrics(tmp_path / "elastic")
    assert sorted(got) == sorted(ref) == list(range(1, 11))
    for s in ref:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-4), s
    assert keys_per_step(tmp_path / "elastic") == keys_per_step(tmp_path / "ref")
    assert len(keys_per_step(tmp_path / "ref")[1]) == 8  # 4 slots x micro batch 2


def test_ranks_die_with_their_launcher(shards, tmp_path):
    """SIGKILL of a torchrun launcher's process group: both ranks (in their own process groups) are gone
    within 5 s instead of training on as orphans."""
    cfg = base_config(tmp_path / "run", shards, curriculum={"stages": [
        {"name": "s", "resolution": 64, "steps": 100000, "micro_batch": 2}]}, log_data_order=False)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (launcher,) = _torchrun(path, tmp_path / "tr", 1, 2, new_session=True)
    pids: list[int] = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                st = [json.loads((tmp_path / "run" / "status" / f"rank{r}.json").read_text()) for r in (0, 1)]
            except (OSError, ValueError):
                st = []
            if st and all(s["state"] == "running" and s["step"] >= 2 for s in st):
                pids = [int(s["pid"]) for s in st]
                break
            assert launcher.poll() is None, (tmp_path / "tr.node0.log").read_text()[-3000:]
            time.sleep(0.5)
        assert pids, "ranks did not start training"
        assert all(os.getpgid(p) != launcher.pid for p in pids)  # torchrun gives ranks their own groups
        os.killpg(launcher.pid, signal.SIGKILL)
        t0 = time.time()
        while time.time() - t0 < 5 and any(_alive(p) for p in pids):
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), f"ranks still alive {time.time() - t0:.1f}s after the kill"
    finally:
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        launcher.wait()
        launcher._log.close()  # type: ignore[attr-defined]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_second_job_on_a_held_run_directory_is_refused(shards, tmp_path, monkeypatch):
    """A run directory held by a live job (here: this test process holds its lease): a new job fails
    with an error naming host, pid and since, and writes nothing."""
    import socket

    from sar_scale.checkpoint.lease import RunDirBusy, RunLease
    from sar_scale.config import load_config
    from sar_scale.training.config import TrainConfig
    from sar_scale.training.trainer import Trainer

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    run = tmp_path / "run"
    held = RunLease(run, stale_s=60).acquire()
    try:
        before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
        cfg = load_config(TrainConfig, base_config(run, shards))
        with pytest.raises(RunDirBusy, match=rf"host {socket.gethostname()}, pid {os.getpid()}, since "):
            Trainer(cfg, resume="auto").run()
        assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != "lease.json"} == \
            {p: t for p, t in before.items() if p.name != "lease.json"}
        assert sorted(p.name for p in run.iterdir()) == ["lease.json"]
    finally:
        held.release()
