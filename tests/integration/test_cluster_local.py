"""The local backend's two "nodes" on loopback: two detached torchrun agents meet in a c10d
rendezvous and train the debug model together, as a multi-node Slurm job would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.backends.local import LocalBackend
from cluster.cli import main as submit_main
from cluster.registry import JobRegistry

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_two_local_nodes_train_together(tmp_path, capsys, monkeypatch):
    from sar_scale.training.debug_data import write_debug_shards

    write_debug_shards(tmp_path / "shards", num_samples=32, samples_per_shard=16)
    monkeypatch.chdir(REPO)
    reg = tmp_path / "reg"
    rc = submit_main(["--backend", "local", "--profile", str(REPO / "configs/cluster/local.yaml"),
                      "--registry", str(reg), "--job-id", "two-nodes", "--nodes", "2", "--procs-per-node", "1",
                      "--wait", "--timeout", "180", "--",
                      "train", "configs/train/debug.yaml", f"data.url={tmp_path / 'shards'}",
                      f"run_dir={tmp_path / 'run'}", "mlflow.enabled=false", "data.num_workers=0",
                      "curriculum.stages=[{name: a, resolution: 64, steps: 2, micro_batch: 2}]"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "job two-nodes: SUCCEEDED" in out
    rec = JobRegistry(reg).get("two-nodes")
    logs = LocalBackend().logs(rec)
    assert "==> node0.log <==" in logs and "==> node1.log <==" in logs
    # one world of 2 ranks spread over the 2 agents
    assert "rank 0/2 (local 0/1" in logs and "done: 2 steps" in logs
    state = json.loads((Path(rec.info["job_dir"]) / "state.json").read_text())
    assert state["state"] == "SUCCEEDED" and state["exit_codes"] == [0, 0]
