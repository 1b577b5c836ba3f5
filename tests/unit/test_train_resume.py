"""Resume planning (a pure function) and the run-directory lease."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from sar_scale.checkpoint.lease import LEASE, RunDirBusy, RunLease
from sar_scale.config import ConfigError
from sar_scale.data.loader import DataPosition
from sar_scale.training.resume import StageShape, plan_resume

STAGES = [StageShape(10, 2), StageShape(5, 1), StageShape(4, 2, "keep")]


def _state(stage=0, step_in_stage=4, world=2, epoch=1, batch=3, slots=4, complete=False, global_step=4):
    return {"global_step": global_step, "stage": stage, "step_in_stage": step_in_stage, "stage_complete": complete,
            "world_size": world, "data": {"epoch": epoch, "batch": batch, "slots": slots}}


def test_fresh_start():
    p = plan_resume(None, None, 2, STAGES, zero_stage=1)
    assert (p.start_stage, p.start_step, p.grad_accum, p.position) == (0, 0, 2, DataPosition(0, 0, 4))
    assert p.resume_from is None and p.init_from is None and p.optimizer == "none" and not p.notes


def test_same_world_restores_everything():
    p = plan_resume(_state(), "ck/step4", 2, STAGES, zero_stage=2)
    assert (p.start_stage, p.start_step, p.grad_accum) == (0, 4, 2)
    assert p.position == DataPosition(1, 3, 4) and p.resume_from == "ck/step4"
    assert p.optimizer == "same_world" and p.global_step == 4 and not p.notes


@pytest.mark.parametrize("world, ga", [(1, 4), (4, 1)])
def test_other_world_keeps_the_global_batch_and_reshards(world, ga):
    p = plan_resume(_state(), "ck/step4", world, STAGES, zero_stage=1)
    assert p.grad_accum == ga and p.position == DataPosition(1, 3, 4) and p.optimizer == "reshard"
    text = " ".join(p.notes)
    assert "universal checkpoint" in text and f"grad_accum 2 -> {ga}" in text


def test_global_batch_that_cannot_be_kept_is_recounted_with_a_note():
    p = plan_resume(_state(slots=4), "ck", 3, STAGES, zero_stage=1)  # 4 slots on 3 ranks: impossible
    assert p.grad_accum == 2 and p.position == DataPosition(1, 3 * 4 // 6, 6)
    assert any("global batch changes from 4 to 6" in n and "may repeat or be skipped" in n for n in p.notes)
    p = plan_resume(_state(), "ck", 1, STAGES, zero_stage=1, elastic_grad_accum=False)
    assert p.grad_accum == 2 and p.position == DataPosition(1, 6, 2)
    assert any("elastic_grad_accum is off" in n for n in p.notes)


def test_refusals_name_the_way_out():
    with pytest.raises(ConfigError, match="written by 2 ranks, this job has 1.*allow_world_size_change"):
        plan_resume(_state(), "ck", 1, STAGES, zero_stage=1, allow_world_size_change=False)
    with pytest.raises(ConfigError, match="ZeRO-3.*6691.*zero_stage 1 or 2"):
        plan_resume(_state(), "ck", 1, STAGES, zero_stage=3)
    assert plan_resume(_state(), "ck", 2, STAGES, zero_stage=3).optimizer == "same_world"
    with pytest.raises(ConfigError, match="stage 5, the config has only 3"):
        plan_resume(_state(stage=5), "ck", 2, STAGES, zero_stage=1)


def test_stage_end_starts_the_next_stage_from_its_weights():
    p = plan_resume(_state(stage=0, step_in_stage=10, complete=True), "ck/end0", 2, STAGES, zero_stage=1)
    assert (p.start_stage, p.start_step, p.resume_from, p.init_from) == (1, 0, None, "ck/end0")
    assert p.optimizer == "none" and p.grad_accum == 1 and p.position == DataPosition(0, 0, 2)
    # optimizer_state=keep: the moments come along, resharded on another world
    p = plan_resume(_state(stage=1, step_in_stage=5, complete=True), "ck/end1", 1, STAGES, zero_stage=2)
    assert p.start_stage == 2 and p.optimizer == "reshard" and p.init_from == "ck/end1"
    # the last stage is done: nothing left
    p = plan_resume(_state(stage=2, step_in_stage=4, complete=True), "ck/end2", 2, STAGES, zero_stage=1)
    assert p.start_stage == len(STAGES)


def test_old_checkpoint_without_world_independent_position():
    st = _state()
    st["data"] = {"epoch": 2, "step": 7}
    p = plan_resume(st, "ck", 2, STAGES, zero_stage=1)
    assert p.position == DataPosition(3, 0, 4) and "older checkpoint" in p.notes[0]


# ----------------------------------------------------------------------------- lease


def test_lease_refuses_a_live_holder_and_names_it(tmp_path):
    run = tmp_path / "run"
    first = RunLease(run, stale_s=30).acquire()
    try:
        before = sorted(p.name for p in run.iterdir())
        with pytest.raises(RunDirBusy, match=rf"host {socket.gethostname()}, pid {os.getpid()}, since .*"
                                             "last heartbeat"):
            RunLease(run, stale_s=30).acquire()
        assert sorted(p.name for p in run.iterdir()) == before == [LEASE]
        first.check()
    finally:
        first.release()
    assert not (run / LEASE).exists()


def test_stale_leases_are_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    # a holder on this host whose process is gone: taken over at once
    (run / LEASE).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "since": 1.0,
                                         "heartbeat": time.time(), "token": "old"}))
    lease = RunLease(run, stale_s=30).acquire()
    assert json.loads((run / LEASE).read_text())["token"] == lease.me["token"]
    lease.release()
    # a holder elsewhere whose heartbeat stopped
    (run / LEASE).write_text(json.dumps({"host": "other-node", "pid": 1, "since": 1.0,
                                         "heartbeat": time.time() - 100, "token": "old"}))
    lease = RunLease(run, stale_s=30).acquire()
    lease.release()
    # ...but a fresh heartbeat from another host holds
    (run / LEASE).write_text(json.dumps({"host": "other-node", "pid": 1, "since": 1.0,
                                         "heartbeat": time.time(), "token": "old"}))
    with pytest.raises(RunDirBusy, match="host other-node, pid 1"):
        RunLease(run, stale_s=30).acquire()


def test_lease_on_the_mirror_and_takeover_detection(tmp_path):
    from sar_scale.data.storage import open_storage

    mirror = open_storage(str(tmp_path / "mirror"))
    a = RunLease(tmp_path / "a", mirror, stale_s=30, beat_s=0.1).acquire()
    with pytest.raises(RunDirBusy, match="mirror.*is held by another training job"):
        RunLease(tmp_path / "b", mirror, stale_s=30).acquire()  # another machine, same mirror
    assert not (tmp_path / "b" / LEASE).exists()  # its local lease was given back
    late = RunLease(tmp_path / "c", mirror, stale_s=30).acquire(mirror_in_background=True)  # what the trainer does
    with pytest.raises(RunDirBusy, match="mirror.*is held by another training job"):
        late.check()  # before its first checkpoint write
    late.release()
    # someone presumed this job dead and took the run directory over: the holder notices
    (tmp_path / "a" / LEASE).write_text(json.dumps({"host": "x", "pid": 2, "since": 1.0,
                                                    "heartbeat": time.time(), "token": "thief"}))
    deadline = time.time() + 5
    while a.lost is None and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(RunDirBusy, match="taken over by host x pid 2"):
        a.check()
    a.release()
    assert json.loads((tmp_path / "a" / LEASE).read_text())["token"] == "thief"  # not ours to delete
