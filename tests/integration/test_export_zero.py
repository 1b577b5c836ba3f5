"""`sar-scale export` on real 2-rank DeepSpeed checkpoints (gloo, CPU): ZeRO-2 and ZeRO-3 written by the
trainer, a universal conversion (ds_to_universal), an s3:// mirror; EMA, upload, MLflow registry.

One 2-process launch trains the debug model under ZeRO-2 (with MLflow) and ZeRO-3 (mirrored to a
loopback S3 server), then - as an independent reference - loads the ZeRO-3 checkpoint into a fresh
engine and gathers its parameters with DeepSpeed's live path. Run as a script, this file is that
worker: ``python tests/integration/test_export_zero.py worker CFG_JSON PORTS REF_DIR``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

REPO = Path(__file__).resolve().parents[2]




def _worker(cfg_json: str, ports: str, ref_dir: str) -> int:
    import deepspeed

    from sar_scale.config import load_config
    from sar_scale.distributed.ds_config import deepspeed_config
    from sar_scale.distributed.init import destroy_distributed, init_distributed
    from sar_scale.models import build_model
    from sar_scale.training.config import TrainConfig
    from sar_scale.training.trainer import Trainer

    base = json.loads(cfg_json)
    p2, p3, p_ref = ports.split(",")
    runs = {}
    for stage, port in ((2, p2), (3, p3)):
        os.environ["MASTER_PORT"] = port
        over = [f"deepspeed.zero_stage={stage}", f"run_dir={base['run_dir']}/z{stage}"]
        if stage == 3:
            over += ["mlflow.enabled=false", f"checkpoint.mirror_url={os.environ['EXPORT_TEST_MIRROR']}"]
        runs[stage] = load_config(TrainConfig, base, over)
        Trainer(runs[stage], resume="none").run()
    # reference: DeepSpeed's own load of the ZeRO-3 partitions into a live engine, then an all-gather
    os.environ["MASTER_PORT"] = p_ref
    cfg = runs[3]
    denv = init_distributed("gloo", "cpu", 60)
    model = build_model(cfg.model.name, **cfg.model.overrides)
    ds = deepspeed_config(cfg, denv.world_size, 0, 2, "cpu")
    groups = Trainer(cfg)._param_groups(model)  # the trainer's optimizer layout, so its state loads
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups), config=ds)
    ckpt = Path(cfg.run_dir) / "checkpoints"
    engine.load_checkpoint(str(ckpt), tag=(ckpt / "latest").read_text().strip(), load_optimizer_states=True)
    full = engine._zero3_consolidated_16bit_state_dict()  # fp32 on CPU: no rounding
    if denv.rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in full.items()}, str(Path(ref_dir) / "z3_live_gather.safetensors"))
    destroy_distributed()
    return 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory, s3_server) -> dict:
    from sar_scale.tokenizers.vq import VQConfig, build_vq, save_vq
    from sar_scale.training.debug_data import write_debug_shards
    from sar_scale.utils.net import free_port
    from tests.integration.train_launch import logs, spawn, wait

    root = tmp_path_factory.mktemp("export_zero")
    write_debug_shards(root / "shards", num_samples=16, resolutions=(64,), samples_per_shard=8, seed=5)
    torch.manual_seed(0)
    vq_dir = save_vq(build_vq(VQConfig.named("demo-small").model_copy(update={"codebook_size": 64})), root / "vq64")
    s3_server.make_bucket("export-test")
    cfg = {
        "run_dir": str(root / "runs"), "seed": 1, "device": "cpu", "model": {"name": "debug"},
        "data": {"url": str(root / "shards"), "num_workers": 0},
        "plan": {"orders": {"random": 1.0}, "num_sets": [2, 4], "intervals": {"random": 1.0}},
        "optim": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"},
        "deepspeed": {"timeout_s": 60}, "ema": {"enabled": True, "decay": 0.5},
        "curriculum": {"stages": [{"name": "s64", "resolution": 64, "steps": 2, "micro_batch": 2}]},
        "mlflow": {"enabled": True, "experiment": "export-test", "vq_path": str(vq_dir), "sample_count": 2},
    }
    ports = ",".join(str(free_port()) for _ in range(3))
    env = {**s3_server.env(), "EXPORT_TEST_MIRROR": "s3://export-test/ckpt-z3"}
    procs = spawn(2, [str(Path(__file__)), "worker", json.dumps(cfg), ports, str(root)], root / "logs",
                  extra_env=env, name="export")
    assert wait(procs, 300) == [0, 0], logs(root / "logs", "export")
    return {"root": root, "z2": root / "runs" / "z2", "z3": root / "runs" / "z3", "vq": vq_dir}


def _export(*argv: str) -> int:
    from sar_scale.export import cli

    return cli.main([*map(str, argv)])


def _weights(d: Path) -> dict[str, torch.Tensor]:
    from sar_scale.export.weights import load_state_dict

    return load_state_dict(d)


def _ckpt(run: Path) -> Path:
    return run / "checkpoints" / "step00000002"


def test_zero2_and_zero3_exports_equal_the_engines_weights(runs, tmp_path):
    from safetensors.torch import load_file

    from sar_scale.export.config import read_export_config

    assert _export(runs["z2"], tmp_path / "e2") == 0  # a run folder: newest complete checkpoint
    assert _export(_ckpt(runs["z3"]), tmp_path / "e3", "--max-shard-size", "300KB") == 0
    w2, w3 = _weights(tmp_path / "e2"), _weights(tmp_path / "e3")
    # ZeRO-2 keeps full fp32 weights in the module; the export (from the optimizer partitions) equals them
    module = torch.load(_ckpt(runs["z2"]) / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    assert set(w2) == set(module) and all(torch.equal(w2[k], module[k]) for k in module)
    # ZeRO-3: equal to what a live engine gathers after loading the same checkpoint
    live = load_file(str(runs["root"] / "z3_live_gather.safetensors"))
    assert set(w3) == set(live) and all(torch.equal(w3[k], live[k]) for k in live)
    # the same run under ZeRO-2 and ZeRO-3: identical up to fp32 reduction order
    for k in w2:
        torch.testing.assert_close(w3[k], w2[k], rtol=0, atol=2e-5)
    c2, c3 = read_export_config(tmp_path / "e2"), read_export_config(tmp_path / "e3")
    assert (c2.source.zero_stage, c3.source.zero_stage) == (2, 3)
    assert c2.source.world_size == c3.source.world_size == 2 and c2.source.global_step == 2
    assert c2.source.mlflow_run_id and c3.source.mlflow_run_id is None
    assert c3.weights.sharded and len(c3.weights.files) >= 2
    assert c2.vq.source == str(runs["vq"])  # found through the training config's mlflow.vq_path
    assert c2.verification.passed and c3.verification.passed
    card = (tmp_path / "e2" / "README.md").read_text()
    assert c2.source.mlflow_run_id in card and "| s64 | 64 px | 2 |" in card and "| 16 |" in card


def test_ema_and_dtype(runs, tmp_path):
    from safetensors.torch import load_file

    assert _export(runs["z3"], tmp_path / "ema", "--ema", "--dtype", "bf16") == 0
    ema = load_file(str(_ckpt(runs["z3"]) / "ema.safetensors"))
    got = _weights(tmp_path / "ema")
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], ema[k].to(torch.bfloat16)) for k in ema)
    assert _export(runs["z3"], tmp_path / "raw") == 0
    raw = _weights(tmp_path / "raw")
    assert any(not torch.equal(raw[k], ema[k]) for k in ema)


def test_universal_checkpoint(runs, tmp_path):
    """DeepSpeed's ds_to_universal output of the ZeRO-2 checkpoint exports to the same weights."""
    out = tmp_path / "universal" / "step00000002"
    r = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                        str(_ckpt(runs["z2"])), "--output_folder", str(out), "--inject_missing_state"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert _export(out, tmp_path / "eu", "--model-config", "debug", "--vq", runs["vq"]) == 0
    module = torch.load(_ckpt(runs["z2"]) / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    got = _weights(tmp_path / "eu")
    assert all(torch.equal(got[k], module[k]) for k in module)


def test_s3_mirror_upload_registry_and_pipeline(runs, tmp_path, s3_env, capsys):
    from mlflow import MlflowClient

    from sar_scale.data.storage import open_storage
    from sar_scale.export.pipeline import SARPipeline

    assert _export("s3://export-test/ckpt-z3", tmp_path / "from_s3", "--upload", "s3://export-test/exports/z3") == 0
    assert _export(runs["z3"], tmp_path / "local") == 0
    a, b = _weights(tmp_path / "from_s3"), _weights(tmp_path / "local")
    assert all(torch.equal(a[k], b[k]) for k in b)
    keys = open_storage("s3://export-test/exports/z3").list("")
    assert {"config.json", "model.safetensors", "README.md", "vq/model.safetensors"} <= set(keys)
    pipe = SARPipeline.from_pretrained("s3://export-test/exports/z3", device="cpu", cache_dir=tmp_path / "cache")
    images = pipe(class_ids=[1, 2], height=64, width=48, steps=3, seed=0)
    assert [im.size for im in images] == [(48, 64)] * 2
    # register the ZeRO-2 export: artifacts go into the training run of the run folder's MLflow store
    assert _export(runs["z2"], tmp_path / "reg", "--register", "sar-debug") == 0
    assert "registered sar-debug v1" in capsys.readouterr().out
    client = MlflowClient(f"sqlite:///{runs['z2'] / 'mlflow.db'}")
    mv = client.get_model_version("sar-debug", "1")
    run_id = (runs["z2"] / "mlflow_run_id").read_text().strip()
    assert mv.run_id == run_id and mv.source == f"runs:/{run_id}/export"
    logged = {f.path for f in client.list_artifacts(run_id, "export")}
    assert {"export/config.json", "export/model.safetensors", "export/README.md", "export/vq"} <= logged
    # an export without a training run in the store (ZeRO-3 run had MLflow off) gets a run of its own
    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    assert _export(runs["z3"], tmp_path / "reg3", "--register", "sar-debug", "--tracking-uri", uri) == 0
    other = MlflowClient(uri)
    mv3 = other.get_model_version("sar-debug", "1")
    assert other.get_experiment(other.get_run(mv3.run_id).info.experiment_id).name == "sar-scale-exports"
    assert mv3.tags["global_step"] == "2" and float(mv3.tags["max_abs_logit_diff"]) == 0.0


def test_broken_checkpoints_are_refused(runs, tmp_path, capsys):
    import shutil

    bad = tmp_path / "ck" / "step00000002"
    shutil.copytree(_ckpt(runs["z3"]), bad)
    opt = next(bad.glob("zero_pp_rank_1_*optim_states.pt"))
    data = bytearray(opt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    opt.write_bytes(bytes(data))
    assert _export(bad, tmp_path / "o1") == 2
    assert f"{opt.name}: sha256 mismatch" in capsys.readouterr().err
    shutil.rmtree(bad)
    shutil.copytree(_ckpt(runs["z3"]), bad)
    (bad / "COMPLETE.json").unlink()
    assert _export(bad, tmp_path / "o2") == 2
    assert "incomplete checkpoint" in capsys.readouterr().err
    (tmp_path / "o3").mkdir()
    (tmp_path / "o3" / "keep.txt").write_text("x")
    assert _export(runs["z3"], tmp_path / "o3") == 2
    assert "is not empty" in capsys.readouterr().err


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        rc = _worker(sys.argv[2], sys.argv[3], sys.argv[4])
        # All work is done and written (the tests check those files). Skip interpreter teardown: a native
        # thread of the process group / DeepSpeed's shm op sometimes aborts in its destructor there
        # ("terminate called without an active exception", rc -6), once in three fresh-clone runs.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    raise SystemExit(f"unknown mode {sys.argv[1]!r}")
