"""`sar-scale sweep`: dry run, and a two-run sweep end to end on the debug model (train, export, eval at
every plan, FID/NLL/s per image table, plot, MLflow parent + children), then a rerun that skips it all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from sar_scale.sweep import load_spec, main

pytestmark = [pytest.mark.integration]


class _FeatNet(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        f = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1)
        return f if return_features else f[:, :4]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from PIL import Image

    from sar_scale.tokenizers.vq import build_vq, save_vq
    from sar_scale.training.debug_data import write_debug_shards

    root = tmp_path_factory.mktemp("sweep")
    torch.manual_seed(0)
    save_vq(build_vq("demo-small"), root / "vq")
    write_debug_shards(root / "shards", num_samples=24, resolutions=(32,), vocab_size=1024, downsample=8)
    torch.jit.script(_FeatNet()).save(str(root / "feat.pt"))
    (root / "real").mkdir()
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 120, 200 - 30 * i)).save(root / "real" / f"{i}.png")
    base = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/train/debug.yaml").read_text())
    base.pop("plan")  # each recipe sets its own (dict overrides merge into the YAML's)
    base.update({"device": "cpu", "log_every": 1,
                 "model": {"name": "debug", "overrides": {"vocab_size": 1024}},
                 "data": {"url": str(root / "shards"), "cond": "class", "num_workers": 0},
                 "deepspeed": {"zero_stage": 0, "precision": "fp32", "timeout_s": 120},
                 "ema": {"enabled": False},
                 "curriculum": {"stages": [{"name": "s32", "resolution": 32, "steps": 3, "micro_batch": 4}]},
                 "checkpoint": {"every_steps": 0, "keep_last": 1},
                 "mlflow": {"enabled": True, "experiment": "x", "vq_path": str(root / "vq")}})
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "mini", "out": str(root / "out"), "seeds": [0],
            "recipes": {"ar": {"config": "base.yaml", "overrides": ["plan.orders={raster: 1.0}",
                                                                     "plan.intervals={ar: 1.0}"]},
                        "sar": {"config": "base.yaml", "overrides": ["plan.orders={random: 1.0}", "plan.num_sets=[4]",
                                                                      "plan.intervals={random: 1.0}"]}},
            "plans": ["raster-ar", "random-4-cosine", "train"],
            "eval": {"images": 4, "batch_size": 4, "grid_images": 4, "nll_shards": str(root / "shards"),
                     "nll_samples": 8, "fid": {"reference": str(root / "real"), "inception": str(root / "feat.pt")}}}
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    return root


def test_dry_run_lists_runs_and_plans(lab, capsys):
    assert main([str(lab / "spec.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 training runs x 3 plans" in out and "ar-s0" in out and "sar-s0" in out and "[to train]" in out
    assert "plans: raster-N-ar, random-4-cosine" in out  # ar's training plan is raster-ar: listed once
    assert "plans: raster-N-ar, random-4-cosine, random-4-random" in out
    assert "sar_scale.cli train" in out and "seed=0" in out
    assert not (lab / "out").exists()  # a dry run starts nothing
    assert main([str(lab / "spec.yaml"), "--dry-run", "--only", "nope"]) == 2
    spec, _ = load_spec(lab / "spec.yaml")
    assert spec.eval.images == 4


def test_two_run_sweep_end_to_end_then_rerun_skips(lab, capsys):
    assert main([str(lab / "spec.yaml")]) == 0
    out_dir = lab / "out"
    res = json.loads((out_dir / "results.json").read_text())
    rows = res["rows"]
    assert {(r["recipe"], r["plan"]) for r in rows} == {("ar", "raster-16-ar"), ("ar", "random-4-cosine"),
                                                         ("sar", "raster-16-ar"), ("sar", "random-4-cosine"),
                                                         ("sar", "random-4-random")}
    for r in rows:
        assert r["fid"] > 0 and r["n_generated"] == 4 and r["n_reference"] == 6 and r["is"] >= 1.0
        assert r["s_per_image"] > 0 and r["nll"] > 0 and r["steps"] == (16 if r["plan"].endswith("-ar") else 4)
    assert [r["train_plan"] for r in rows if r["recipe"] == "sar"] == [False, False, True]
    md = (out_dir / "results.md").read_text()
    assert "| FID |" in md and "**random-4-random** (train)" in md
    assert (out_dir / "quality_vs_speed.png").stat().st_size > 5000
    # MLflow: a parent run with table + plot; both training runs are its children with per-plan metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out_dir / 'mlflow.db'}")
    parent = json.loads((out_dir / "sweep_state.json").read_text())["parent_run_id"]
    arts = {a.path for a in client.list_artifacts(parent)}
    assert {"results.md", "results.json", "quality_vs_speed.png"} <= arts
    exp = client.get_experiment_by_name("mini")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(c.info.run_name for c in children) == ["mini/ar-s0", "mini/sar-s0"]
    sar = next(c for c in children if c.info.run_name == "mini/sar-s0")
    assert "eval/random-4-random/fid" in sar.data.metrics and "train/loss" in sar.data.metrics or \
        any(k.endswith("loss") for k in sar.data.metrics)
    # rerun: nothing is trained or sampled again, the same table comes back
    logs = {p: p.stat().st_mtime for p in out_dir.glob("runs/*/logs/train.log")}
    capsys.readouterr()
    assert main([str(lab / "spec.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.count("trained and exported: skipping training") == 2
    assert {p: p.stat().st_mtime for p in logs} == logs
    assert json.loads((out_dir / "results.json").read_text())["rows"] == rows
    assert json.loads((out_dir / "sweep_state.json").read_text())["parent_run_id"] == parent
