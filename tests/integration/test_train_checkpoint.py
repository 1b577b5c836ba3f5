"""Single-process training runs (real DeepSpeed engine, gloo, world of one) and their checkpoints:
curriculum, exact resume inside stage 2, keep-last-K, checksum verification and fallback, mirror,
MLflow (embedded SQLite) read back with MlflowClient, secrets never written."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from sar_scale.checkpoint.manager import (
    CheckpointError,
    CheckpointManager,
    list_checkpoints,
    read_train_state,
    rng_state,
    set_rng_state,
    verify_checkpoint,
)
from sar_scale.config import load_config
from sar_scale.training.config import TrainConfig
from sar_scale.training.debug_data import write_debug_shards

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # real DeepSpeed training runs

CANARY = "CANARY-7c1d-secret-value"


def make_cfg(run_dir: Path, shards: str, **over) -> TrainConfig:
    base = {
        "run_dir": str(run_dir), "seed": 1, "device": "cpu",
        "model": {"name": "debug"},
        "data": {"url": shards, "num_workers": 0},
        "plan": {"orders": {"random": 1.0, "raster": 1.0}, "num_sets": [2, 4], "intervals": {"random": 1.0}},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "deepspeed": {"zero_stage": 1, "timeout_s": 60},
        "ema": {"enabled": True, "decay": 0.9},
        "curriculum": {"stages": [
            {"name": "s64", "resolution": 64, "steps": 4, "micro_batch": 3, "grad_accum": 2},
            {"name": "s128", "resolution": 128, "steps": 4, "tokens_per_batch": 130, "lr": 1e-3}]},
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "mlflow": {"enabled": True, "experiment": "unit", "run_name": CANARY},
        "log_data_order": True,
    }
    return load_config(TrainConfig, base, [f"{k}={v}" for k, v in over.items()])


def metrics(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec  # a resumed run re-logs steps after its checkpoint: keep the last
    return out


def data_order(run_dir: Path, rank: int = 0) -> dict[tuple[int, int], list[str]]:
    out = {}
    for line in (run_dir / "data_order" / f"rank{rank}.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[(r["global_step"], r["micro"])] = r["keys"]
    return out


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    from sar_scale.tokenizers.vq import VQConfig, VQModel, save_vq

    torch.manual_seed(0)
    vq = VQModel(VQConfig(codebook_size=64, codebook_embed_dim=4, ch=32, ch_mult=[1, 1], z_channels=8,
                          num_res_blocks=1))
    return str(save_vq(vq, tmp_path_factory.mktemp("vq") / "vq"))


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, vq_dir):
    """One uninterrupted 2-stage run with a local checkpoint mirror and sample images."""
    mp = pytest.MonkeyPatch()
    mp.setenv("OMP_NUM_THREADS", "1")
    mp.setenv("AWS_SECRET_ACCESS_KEY", CANARY)  # planted: must never reach any file or MLflow
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI"):
        mp.delenv(k, raising=False)
    tmp = tmp_path_factory.mktemp("train")
    shards = str(tmp / "shards")
    write_debug_shards(shards, num_samples=40, resolutions=(64, 128), samples_per_shard=10, seed=5)
    from sar_scale.training.trainer import Trainer

    cfg = make_cfg(tmp / "a", shards, **{"checkpoint.mirror_url": str(tmp / "mirror"),
                                         "mlflow.vq_path": vq_dir, "mlflow.sample_count": 2})
    result = Trainer(cfg, resume="auto").run()
    yield {"tmp": tmp, "shards": shards, "cfg": cfg, "result": result, "mp": mp}
    mp.undo()


def test_curriculum_run_outputs(run_a):
    r, run_dir = run_a["result"], run_a["tmp"] / "a"
    assert r.global_step == 8 and r.last_checkpoint.name == "step00000008"
    m = metrics(run_dir)
    assert sorted(m) == list(range(1, 9))
    assert [m[s]["resolution"] for s in (1, 4, 5, 8)] == [64, 64, 128, 128]  # switch after stage 1
    assert all(b in ("4x4", "3x5", "5x3") for s in range(1, 5) for b in m[s]["buckets"])
    assert all(b in ("8x8", "6x10", "10x6") for s in range(5, 9) for b in m[s]["buckets"])
    assert m[1]["lr"] == 0.0 and m[2]["lr"] == pytest.approx(3e-3)  # warmup then cosine
    assert m[5]["lr"] == 0.0 and m[6]["lr"] == pytest.approx(1e-3)  # fresh schedule in stage 2
    order = data_order(run_dir)
    assert len(order[(5, 0)]) == 2 and len(order[(1, 0)]) == 3  # 130 tokens // 64 = 2 per micro batch
    tags = [c.tag for c in list_checkpoints(run_dir / "checkpoints")]
    assert tags == ["step00000004", "step00000006", "step00000008"]  # keep-last 2 + the stage end
    st4 = read_train_state(run_dir / "checkpoints" / "step00000004")
    assert st4["stage_complete"] and st4["stage_name"] == "s64"
    st6 = read_train_state(run_dir / "checkpoints" / "step00000006")
    # data position: global batches consumed, counted in global batches of 1 micro-batch (1 rank x 1)
    assert (st6["stage"], st6["step_in_stage"], st6["data"]["epoch"], st6["data"]["batch"],
            st6["data"]["slots"]) == (1, 2, 0, 2, 1)
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000008"
    for f in ("config.yaml", "ds_config.s64.json", "ds_config.s128.json", "status/rank0.json"):
        assert (run_dir / f).is_file()
    assert json.loads((run_dir / "status/rank0.json").read_text())["state"] == "finished"
    # stage 2 started from stage 1's final weights: step 5 has lr 0 (warmup), step 6 one small step
    from sar_scale.models import build_model
    from sar_scale.training.trainer import Trainer

    w4 = Trainer.load_consolidated(run_dir / "checkpoints" / "step00000004")
    w6 = Trainer.load_consolidated(run_dir / "checkpoints" / "step00000006")
    torch.manual_seed(1)
    w0 = build_model("debug").state_dict()
    assert max((w6[k] - w4[k]).abs().max().item() for k in w4) < 2.5e-3
    assert max((w4[k] - w0[k]).abs().max().item() for k in w4) > 5e-3


def test_resume_inside_stage_two_is_exact(run_a):
    """Resume from the step-6 checkpoint (inside stage 2): steps 7-8 repeat run A exactly."""
    from sar_scale.training.trainer import Trainer

    tmp = run_a["tmp"]
    b = tmp / "b"
    shutil.copytree(tmp / "a" / "checkpoints" / "step00000006", b / "checkpoints" / "step00000006")
    # activation checkpointing on in the resumed run only: recomputation must not change a single loss
    cfg = make_cfg(b, run_a["shards"], **{"mlflow.enabled": False, "model.activation_checkpointing": True})
    res = Trainer(cfg, resume="auto").run()
    assert res.global_step == 8
    ma, mb = metrics(tmp / "a"), metrics(b)
    assert sorted(mb) == [7, 8]
    for s in (7, 8):
        assert mb[s]["micro_losses"] == pytest.approx(ma[s]["micro_losses"], abs=1e-6)
        assert mb[s]["lr"] == pytest.approx(ma[s]["lr"])
    oa, ob = data_order(tmp / "a"), data_order(b)
    assert {k: v for k, v in oa.items() if k[0] > 6} == ob


def test_resume_auto_falls_back_past_bad_checkpoints(run_a, tmp_path, caplog):
    root = tmp_path / "ckpts"
    shutil.copytree(run_a["tmp"] / "a" / "checkpoints", root)
    mgr = CheckpointManager(root)
    for c in list_checkpoints(root):
        verify_checkpoint(c.path)
    # newest: one flipped byte in the optimizer state; the one before: COMPLETE marker missing
    newest = root / "step00000008"
    victim = newest / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    (root / "step00000006" / "COMPLETE.json").unlink()
    with caplog.at_level(logging.WARNING):
        chosen = mgr.find_resume("auto")
    assert chosen == root / "step00000004"
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt: sha256 mismatch" in caplog.text
    assert "step00000006: incomplete" in caplog.text
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        mgr.find_resume(str(newest))  # an explicit bad choice is an error, not a silent fallback
    # truncated and missing files are named too
    t = root / "step00000004" / "mp_rank_00_model_states.pt"
    t.write_bytes(t.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: size 100"):
        verify_checkpoint(root / "step00000004")
    fresh = tmp_path / "fresh4"
    shutil.copytree(run_a["tmp"] / "a" / "checkpoints" / "step00000004", fresh)
    (fresh / "rng_rank0.json").unlink()
    with pytest.raises(CheckpointError, match="rng_rank0.json: missing"):
        verify_checkpoint(fresh)
    assert mgr.find_resume("auto") is None
    # the newer, bad checkpoints are moved aside (kept for forensics), never deleted
    mgr.retire_after(4)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step00000008")) == ["step00000008.retired-0"]


def test_mirror_holds_complete_checkpoints_and_restores_them(run_a, tmp_path):
    mirror = run_a["tmp"] / "mirror"
    assert (mirror / "latest").read_text() == "step00000008"
    assert sorted(p.parent.name for p in mirror.glob("*/COMPLETE.json")) == [
        "step00000004", "step00000006", "step00000008"]  # pruned there too
    assert not list(mirror.glob("step00000002/*"))
    mgr = CheckpointManager(tmp_path / "empty", mirror_url=str(mirror))
    got = mgr.find_resume("auto")  # nothing local: the newest verified checkpoint comes from the mirror
    assert got == tmp_path / "empty" / "step00000008"
    verify_checkpoint(got)


def test_rng_state_json_roundtrip():
    import random

    import numpy as np

    st = rng_state()
    json.dumps(st)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(st)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_mlflow_run_params_metrics_images_and_no_secrets(run_a):
    from mlflow.tracking import MlflowClient

    run_dir = run_a["tmp"] / "a"
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(run_a["result"].mlflow_run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["deepspeed.zero_stage"] == "1" and p["curriculum.stages.1.resolution"] == "128"
    assert p["mlflow.run_name"] == "***"
    losses = client.get_metric_history(run.info.run_id, "1-train/loss")
    assert sorted(m.step for m in losses) == list(range(1, 9))
    for key in ("1-train/lr", "1-train/grad_norm", "2-throughput/tokens_per_s", "2-throughput/step_time_s",
                "2-throughput/data_wait_s", "2-throughput/flops_per_s", "3-loss-by-stage/s128"):
        assert key in run.data.metrics, key
    assert run.data.tags["checkpoint.latest"].endswith("step00000008")
    arts = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert "samples/s64_step00000004.png" in arts and "samples/s128_step00000008.png" in arts
    img = client.download_artifacts(run.info.run_id, "samples/s128_step00000008.png", str(run_dir / "dl"))
    from PIL import Image

    sizes = {(k * w * 2, h * 2) for k in (1, 2) for h, w in ((8, 8), (6, 10), (10, 6))}  # VQ downsample 2
    assert Image.open(img).size in sizes
    # promise 8: the planted secret appears nowhere in the run folder or MLflow
    assert CANARY not in json.dumps(run.data.params) + json.dumps(run.data.tags)
    for f in run_dir.rglob("*"):
        if f.is_file() and f.suffix != ".pt":
            assert CANARY.encode() not in f.read_bytes(), f


def test_logged_flops_are_the_plans_flops(run_a):
    """The MFU logged by the trainer and the step time of `sar-scale plan` use one FLOP count."""
    from cluster.plan import plan_stages
    from sar_scale.models.flops import model_shape, train_flops_per_sample

    cfg = run_a["cfg"]
    shape, plans = plan_stages([(cfg, "run_a")] * 2, nodes=1, gpus_per_node=1, mfu=0.5, peak_tflops=1.0,
                               gpu_mem_gib=80.0, downsample=8)
    debug = model_shape("debug")
    assert plans[0].tflop_per_step * 1e12 / plans[0].global_batch == pytest.approx(train_flops_per_sample(debug, 64))
    logged = [r for r in metrics(run_a["tmp"] / "a").values() if r["stage"] == 0]  # 3 samples per micro step
    assert logged
    for r in logged:  # flops_per_s and samples_per_s share one step time; one bucket per micro step
        n = [int(b.split("x")[0]) * int(b.split("x")[1]) for b in r["buckets"]]
        want = sum(train_flops_per_sample(debug, k) for k in n) / len(n)
        assert r["flops_per_s"] / r["samples_per_s"] == pytest.approx(want, rel=1e-9)


def test_text_encoder_on_the_fly_kept_optimizer_and_activation_checkpointing(run_a, tmp_path):
    """Text-conditional model fed by a TextEncoder on the fly (shards without text.npy), stage 2 keeping
    stage 1's AdamW moments, activation checkpointing on: trains, and Adam's step count carries over."""
    from sar_scale.tokenizers.text import build_tiny_text_encoder
    from sar_scale.training.trainer import Trainer

    enc = build_tiny_text_encoder(tmp_path / "enc", kind="t5", width=32, max_length=16)
    runs = {}
    for keep in ("reset", "keep"):
        cfg = make_cfg(tmp_path / keep, run_a["shards"], **{
            "model.overrides": "{cond: text, text_dim: 32, max_text_len: 16}",
            "model.activation_checkpointing": "true", "data.text_encoder": str(enc), "mlflow.enabled": "false",
            "checkpoint.every_steps": 0, "ema.enabled": "false",
            "curriculum.stages": "[{name: a, resolution: 64, steps: 2, micro_batch: 2}, "
                                 f"{{name: b, resolution: 64, steps: 2, micro_batch: 2, optimizer_state: {keep}}}]"})
        runs[keep] = Trainer(cfg, resume="none").run()
        assert runs[keep].global_step == 4
        m = metrics(tmp_path / keep)
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in m.values())
        assert m[3]["lr"] == 0.0  # a fresh warmup schedule in stage b either way

    def adam_step(run_dir):
        sd = torch.load(run_dir / "checkpoints" / "step00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                        map_location="cpu", weights_only=False)  # our own, just written
        state = sd["optimizer_state_dict"]["base_optimizer_state"]["state"]
        return int(next(iter(state.values()))["step"])

    assert adam_step(tmp_path / "reset") == 2 and adam_step(tmp_path / "keep") == 4
