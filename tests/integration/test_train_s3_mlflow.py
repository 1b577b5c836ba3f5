"""Training against real loopback servers: shards read from S3 (moto_server), checkpoints mirrored to
S3 and restored from there, metrics/params/images in a real `mlflow server` whose artifacts live on S3."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sar_scale.config import load_config
from sar_scale.training.config import TrainConfig
from sar_scale.training.debug_data import write_debug_shards
from sar_scale.utils.net import free_port
from tests.conftest import wait_http

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def mlflow_server(s3_env, tmp_path):
    """`mlflow server --workers 1` (lean flags), SQLite backend, artifacts proxied to the S3 bucket."""
    bucket = s3_env.make_bucket("mlf-artifacts")
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true",
               MLFLOW_S3_ENDPOINT_URL=s3_env.endpoint)
    exe = str(Path(sys.executable).parent / "mlflow")
    log = open(tmp_path / "mlflow.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--serve-artifacts", "--artifacts-destination", f"s3://{bucket}/mlartifacts"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=90)
        yield f"http://127.0.0.1:{port}", bucket
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_s3_shards_s3_checkpoints_and_mlflow_server(s3_env, mlflow_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from sar_scale.tokenizers.vq import VQConfig, VQModel, save_vq
    from sar_scale.training.trainer import Trainer

    uri, art_bucket = mlflow_server
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(k, raising=False)
    data = s3_env.make_bucket("train-data")
    write_debug_shards(f"s3://{data}/shards", num_samples=24, resolutions=(64,), samples_per_shard=8, seed=2)
    torch.manual_seed(0)
    vq = save_vq(VQModel(VQConfig(codebook_size=64, codebook_embed_dim=4, ch=32, ch_mult=[1, 1], z_channels=8,
                                  num_res_blocks=1)), tmp_path / "vq")
    cfg = load_config(TrainConfig, {
        "run_dir": str(tmp_path / "run"), "device": "cpu", "model": {"name": "debug"},
        "data": {"url": f"s3://{data}/shards", "num_workers": 1},
        "deepspeed": {"zero_stage": 2, "timeout_s": 60},
        "curriculum": {"stages": [{"name": "s64", "resolution": 64, "steps": 3, "micro_batch": 2}]},
        "checkpoint": {"mirror_url": f"s3://{data}/ckpt", "every_steps": 2},
        "mlflow": {"tracking_uri": uri, "vq_path": str(vq), "sample_count": 2}})
    res = Trainer(cfg, resume="auto").run()
    assert res.global_step == 3

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["deepspeed.zero_stage"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "1-train/loss")] == [1, 2, 3]
    assert "samples/s64_step00000003.png" in [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    keys = [o["Key"] for o in s3_env.client().list_objects_v2(Bucket=art_bucket).get("Contents", [])]
    assert any(k.endswith("samples/s64_step00000003.png") for k in keys)  # the image lives on S3

    s3 = s3_env.client()
    ck = [o["Key"] for o in s3.list_objects_v2(Bucket=data, Prefix="ckpt/").get("Contents", [])]
    assert "ckpt/step00000003/COMPLETE.json" in ck and "ckpt/latest" in ck
    assert s3.get_object(Bucket=data, Key="ckpt/latest")["Body"].read() == b"step00000003"

    # a new machine: no local checkpoints; --resume auto downloads the newest verified one from S3
    shutil.rmtree(tmp_path / "run")
    res2 = Trainer(cfg, resume="auto").run()
    assert res2.global_step == 3 and (tmp_path / "run" / "checkpoints" / "step00000003" / "COMPLETE.json").is_file()
    assert res2.mlflow_run_id == res.mlflow_run_id  # the same MLflow run, reattached from train_state
    log0 = (tmp_path / "run" / "logs" / "rank0.log").read_text()
    assert "downloaded checkpoint step00000003" in log0 and "reattached to MLflow run" in log0
