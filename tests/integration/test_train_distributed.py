"""Multi-process training on the CPU (gloo): ZeRO 0-3 agree, two "nodes", SIGKILL + resume is exact,
a dead or hung rank makes the survivors exit in bounded time and name the culprit."""

from __future__ import annotations

import json
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
    data_order,
    logs,
    metrics,
    rank_env,
    spawn,
    stop,
    train_argv,
    wait,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_debug_shards(root, num_samples=48, resolutions=(64, 128), samples_per_shard=12, seed=11)
    return root


@pytest.fixture(scope="module")
def zero_sweep(tmp_path_factory, shards):
    """2 ranks, the same run under ZeRO 0, 1, 2, 3 (sequentially inside one process per rank)."""
    tmp = tmp_path_factory.mktemp("zero")
    import torch

    from sar_scale.tokenizers.vq import VQConfig, VQModel, save_vq

    torch.manual_seed(0)
    vq = save_vq(VQModel(VQConfig(codebook_size=64, codebook_embed_dim=4, ch=32, ch_mult=[1, 1], z_channels=8,
                                  num_res_blocks=1)), tmp / "vq")
    # sample grids at the stage end: under ZeRO-3 the weights are gathered collectively first
    cfg = base_config(tmp / "runs", shards, mlflow={"enabled": True, "vq_path": str(vq), "sample_count": 2})
    ports = ",".join(str(free_port()) for _ in range(4))
    procs = spawn(2, [str(REPO / "tests/integration/train_launch.py"), "zero-sweep", json.dumps(cfg), ports],
                  tmp / "logs", name="sweep")
    codes = wait(procs, 300)
    assert codes == [0, 0], logs(tmp / "logs", "sweep")
    return tmp / "runs"


def test_zero_stages_0_to_3_agree(zero_sweep):
    m = {z: metrics(zero_sweep / f"z{z}") for z in range(4)}
    for z in (1, 2, 3):
        # same seed, data and plans: first-step losses agree; after one AdamW step still within fp32 noise
        assert m[z][1]["micro_losses"] == pytest.approx(m[0][1]["micro_losses"], abs=1e-5), z
        assert m[z][2]["micro_losses"] == pytest.approx(m[0][2]["micro_losses"], abs=2e-4), z
        assert m[z][1]["grad_norm"] == pytest.approx(m[0][1]["grad_norm"], rel=1e-4), z
    # both ranks read different samples of the same bucket at every micro step
    for z in range(4):
        o0, o1 = data_order(zero_sweep / f"z{z}", 0), data_order(zero_sweep / f"z{z}", 1)
        assert o0.keys() == o1.keys() and all(not set(o0[k]) & set(o1[k]) for k in o0)
    assert data_order(zero_sweep / "z0", 0) == data_order(zero_sweep / "z3", 0)
    # ZeRO-3 writes per-rank partitions and a gathered full-shape EMA
    ck = zero_sweep / "z3" / "checkpoints" / "step00000002"
    assert len(list(ck.glob("zero_pp_rank_*_optim_states.pt"))) == 2
    from safetensors.torch import load_file

    from sar_scale.models import build_model

    for z in range(4):
        assert len(list((zero_sweep / f"z{z}" / "mlartifacts").rglob("samples/s64_step00000002.png"))) == 1, z
    ema = load_file(str(ck / "ema.safetensors"))
    shapes = {k: tuple(v.shape) for k, v in build_model("debug").named_parameters()}
    assert {k: tuple(v.shape) for k, v in ema.items()} == shapes


def test_two_nodes_with_torchrun_match_single_node(zero_sweep, shards, tmp_path):
    """Two torchrun invocations (--nnodes=2, node_rank 0/1) rendezvous on 127.0.0.1, ZeRO-3."""
    cfg = base_config(tmp_path / "run", shards, deepspeed={"zero_stage": 3, "timeout_s": 60})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    port = free_port()
    torchrun = str(Path(sys.executable).parent / "torchrun")
    procs = []
    for node in (0, 1):
        env = rank_env(0, 1, port)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k)
        log = open(tmp_path / f"node{node}.log", "wb")  # noqa: SIM115
        procs.append(subprocess.Popen(
            [torchrun, "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
             f"--master_port={port}", "-m", "sar_scale.cli", "train", str(cfg_path), "--resume", "none"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
        procs[-1]._log = log
    codes = wait(procs, 300)
    out = "\n".join((tmp_path / f"node{n}.log").read_text(errors="replace")[-3000:] for n in (0, 1))
    assert codes == [0, 0], out
    status = json.loads((tmp_path / "run" / "status" / "rank1.json").read_text())
    assert status["state"] == "finished"
    rank1_log = (tmp_path / "run" / "logs" / "rank1.log").read_text()
    assert "via torchrun" in rank1_log and "node 1" in rank1_log
    two_node, single = metrics(tmp_path / "run"), metrics(zero_sweep / "z3")
    for s in (1, 2):
        assert two_node[s]["micro_losses"] == pytest.approx(single[s]["micro_losses"], abs=1e-5)


def test_sigkill_at_random_points_then_resume_matches_uninterrupted(shards, tmp_path):
    """Reference run vs. a run killed (SIGKILL, all ranks) mid-checkpoint-save and again mid-stage-2,
    resumed with --resume auto each time: every step's losses and every rank's data order are equal."""
    stages = [{"name": "s64", "resolution": 64, "steps": 3, "micro_batch": 2, "grad_accum": 2},
              {"name": "s128", "resolution": 128, "steps": 3, "micro_batch": 1}]
    runs = {}
    for name in ("ref", "killed"):
        cfg = base_config(tmp_path / name, shards, curriculum={"stages": stages},
                          checkpoint={"every_steps": 2, "keep_last": 2})
        runs[name] = tmp_path / f"{name}.yaml"
        runs[name].write_text(yaml.safe_dump(cfg))
    logs_dir = tmp_path / "logs"
    assert wait(spawn(2, train_argv(runs["ref"]), logs_dir, name="ref"), 300) == [0, 0], logs(logs_dir, "ref")

    # 1) killed while step 4's checkpoint is half written (files on disk, no COMPLETE marker)
    fault = {"SAR_SCALE_FAULT": "kill:ckpt_files_written:step=4"}
    codes = wait(spawn(2, train_argv(runs["killed"]), logs_dir, fault, name="k1"), 300)
    assert all(c != 0 for c in codes)
    ck = tmp_path / "killed" / "checkpoints"
    assert (ck / "step00000004").is_dir() and not (ck / "step00000004" / "COMPLETE.json").exists()
    # 2) resumed from step 3 (end of stage 1, the newest complete one), killed after step 5
    fault = {"SAR_SCALE_FAULT": "kill:after_step:step=5"}
    codes = wait(spawn(2, train_argv(runs["killed"]), logs_dir, fault, name="k2"), 300)
    assert all(c != 0 for c in codes)
    assert "skipping" in logs(logs_dir, "k2") or "incomplete" in (tmp_path / "killed/logs/rank0.log").read_text()
    # 3) resumed from step 4 (inside stage 2) and finishes
    assert wait(spawn(2, train_argv(runs["killed"]), logs_dir, name="k3"), 300) == [0, 0], logs(logs_dir, "k3")
    log0 = (tmp_path / "killed" / "logs" / "rank0.log").read_text()
    assert "resuming from" in log0 and "step00000003" in log0 and "step00000004 (global step 4" in log0
    ref, got = metrics(tmp_path / "ref"), metrics(tmp_path / "killed")
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    for s in ref:
        assert got[s]["micro_losses"] == pytest.approx(ref[s]["micro_losses"], abs=1e-6), s
    for r in (0, 1):
        assert data_order(tmp_path / "killed", r) == data_order(tmp_path / "ref", r)


@pytest.mark.parametrize("fault, bound", [("kill", 60), ("hang", 60)])
def test_dead_or_hung_rank_makes_survivor_exit_in_bounded_time(shards, tmp_path, fault, bound):
    """Promise 9: rank 1 dies (SIGKILL) or hangs after step 2; rank 0 exits non-zero within the bound
    (collective timeout 8 s for the hang) and its status names the failed rank."""
    cfg = base_config(tmp_path / "run", shards, deepspeed={"zero_stage": 2, "timeout_s": 8},
                      curriculum={"stages": [{"name": "s", "resolution": 64, "steps": 50, "micro_batch": 2}]})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    procs = spawn(2, train_argv(path), tmp_path / "logs", {"SAR_SCALE_FAULT": f"{fault}:after_step:step=2:rank=1"})
    t0 = time.time()
    try:
        code0 = procs[0].wait(bound)
    finally:
        elapsed = time.time() - t0
        stop(procs)  # kills the hung rank 1
    assert code0 != 0, logs(tmp_path / "logs", "run")
    assert elapsed < bound
    status = json.loads((tmp_path / "run" / "status" / "rank0.json").read_text())
    assert status["state"] == "failed" and status["step"] >= 2
    if fault == "kill":
        assert "rank 1: process" in status["peers"] and "is gone" in status["peers"]
    else:
        assert "timed out" in status["error"].lower()  # the collective timeout fired (8 s), no hang


def test_nan_loss_on_one_rank_stops_every_rank_before_the_next_checkpoint(shards, tmp_path):
    """The step metrics are read one step late (the collective runs while the next step works): a NaN loss
    of step 4 on rank 1 only still stops both ranks with an error naming step 4, and the checkpoint due at
    step 4 is never written (a checkpoint reads its own step's sums first)."""
    cfg = base_config(tmp_path / "run", shards, checkpoint={"every_steps": 2, "keep_last": 3},
                      curriculum={"stages": [{"name": "s", "resolution": 64, "steps": 6, "micro_batch": 2}]})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    procs = spawn(2, train_argv(path), tmp_path / "logs", {"SAR_SCALE_FAULT": "nan:loss:step=4:rank=1"})
    codes = wait(procs, 300)
    assert all(c != 0 for c in codes), logs(tmp_path / "logs", "run")
    for r in (0, 1):
        status = json.loads((tmp_path / "run" / "status" / f"rank{r}.json").read_text())
        assert status["state"] == "failed" and "loss is nan at global step 4" in status["error"], status
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "step00000002" / "COMPLETE.json").exists()
    assert not list(ck.glob("step0000000[3-9]*"))
    assert sorted(metrics(tmp_path / "run")) == [1, 2, 3]


def test_zero3_resume_on_a_different_world_size_is_refused_clearly(zero_sweep, shards, tmp_path, monkeypatch):
    """A 2-rank ZeRO-3 checkpoint resumed by 1 rank: refused, naming the ZeRO-3 limitation and the way
    out (ZeRO-1/2 reshard through universal checkpoints: tests/integration/test_train_elastic.py);
    with checkpoint.allow_world_size_change=false any world-size change is refused."""
    import shutil

    from sar_scale.config import ConfigError, load_config
    from sar_scale.training.config import TrainConfig
    from sar_scale.training.trainer import Trainer

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    run = tmp_path / "run"
    shutil.copytree(zero_sweep / "z3" / "checkpoints", run / "checkpoints")
    stages = [{"name": "s64", "resolution": 64, "steps": 3, "micro_batch": 2, "grad_accum": 2}]
    cfg = load_config(TrainConfig, base_config(run, shards, curriculum={"stages": stages},
                                               deepspeed={"zero_stage": 3, "timeout_s": 60}))
    with pytest.raises(ConfigError, match="written by 2 ranks, this job has 1, under ZeRO-3.*zero_stage 1 or 2"):
        Trainer(cfg, resume="auto").run()
    cfg = load_config(TrainConfig, cfg.model_dump(), ["checkpoint.allow_world_size_change=false"])
    with pytest.raises(ConfigError, match="written by 2 ranks, this job has 1: resume with 2 ranks"):
        Trainer(cfg, resume="auto").run()
