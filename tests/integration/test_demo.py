"""The demo, reduced to a few hundred images and a few dozen steps, runs every real stage.

`sar-scale demo` is run as users run it (a subprocess of the CLI): synth (+ corrupt files) ->
VQ training -> tiny text encoder -> Ray pipeline -> 2-rank DeepSpeed curriculum with MLflow ->
export -> sample grid -> eval. The test checks each stage's output, not model quality (the full
demo's accuracy is measured separately and reported in the README).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_reduced_demo_end_to_end(tmp_path):
    work = tmp_path / "demo"
    env = {**os.environ, "SAR_SCALE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "sar_scale.cli", "demo", "--workdir", str(work), "--images", "200",
           "--heldout", "32", "--corrupt", "6", "--vq-steps", "20", "--train-steps", "20", "10",
           "--eval-steps", "4", "--eval-orders", "random", "--no-eval-ar", "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    stages = summary["stages"]
    assert all(s["status"] in ("ok", "cached") for s in stages.values()), stages
    facts = summary["facts"]

    # synth + reject path: every corrupt file is rejected and counted by reason
    assert len(list((work / "data" / "shapes").glob("[0-9]*.png"))) == 200
    corrupt = [json.loads(x) for x in (work / "data" / "shapes" / "corrupt.jsonl").read_text().splitlines()]
    assert len(corrupt) == 6
    manifest = json.loads((work / "shards" / "manifest.json").read_text())
    rejected = {json.loads(x)["source_id"] for x in (work / "shards" / "rejects.jsonl").read_text().splitlines()}
    assert all(any(c["file"].split(".")[0] in r for r in rejected) for c in corrupt), rejected
    assert sum(manifest["rejects"].values()) >= 6 and manifest["samples"] == 200
    assert facts["rejects"] == manifest["rejects"]
    assert set(manifest["buckets"]) == {"32", "64"} and len(manifest["buckets"]["64"]) >= 2  # several buckets
    assert json.loads((work / "shards_heldout" / "manifest.json").read_text())["samples"] == 32

    # VQ (cached for the next run) and text encoder
    assert (work / "vq" / "model.safetensors").is_file()
    assert len(list((tmp_path / "cache" / "demo_vq").iterdir())) == 1
    assert (work / "text_encoder" / "config.json").is_file()

    # 2-rank curriculum training, both stages, checkpoints, MLflow with metrics and images
    cfg = (work / "train" / "config.yaml").read_text()
    assert "s32" in cfg and "s64" in cfg
    metrics = [json.loads(x) for x in (work / "train" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert {m.get("resolution") for m in metrics if "loss" in m} == {32, 64}
    assert max(m.get("step", 0) for m in metrics) == 30 and facts["train_steps"] == [20, 10]
    for r in (0, 1):  # two DeepSpeed ranks ran to the end
        assert json.loads((work / "train" / "status" / f"rank{r}.json").read_text())["state"] == "finished"
    assert (work / "train" / "checkpoints" / "latest").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'train' / 'mlflow.db'}")
    run = client.get_run(facts["mlflow_run_id"])
    assert len(client.get_metric_history(run.info.run_id, "1-train/loss")) >= 2
    samples = [f.path for f in client.list_artifacts(run.info.run_id, "samples")]
    assert any(p.endswith(".png") for p in samples), samples
    assert [f.path for f in client.list_artifacts(run.info.run_id, "demo")] == ["demo/grid.png"]
    assert any(k.startswith("eval/shapes/") for k in run.data.metrics)
    assert any(k.startswith("eval/nll/") for k in run.data.metrics)

    # export generates: the sample grid exists, and the export loads and samples again here
    assert (work / "samples" / "grid.png").is_file()
    from sar_scale.export.pipeline import SARPipeline

    pipe = SARPipeline.from_pretrained(work / "model", device="cpu")
    (img,) = pipe(["a red circle on the left"], height=64, width=64, steps=4, seed=0)
    assert img.size == (64, 64)
    ev = json.loads((work / "eval" / "results.json").read_text())
    assert ev["shapes"]["plans"] and all(0.0 <= p["acc_all"] <= 1.0 for p in ev["shapes"]["plans"])
    assert all(p["nll"] > 0 for p in ev["nll"]["plans"])
    # the release carries the sampling settings it was evaluated with, and the table names them
    assert pipe.config.sampling.temperature == 0.3 == ev["shapes"]["settings"]["temperature"]
    assert "sampled at cfg" in proc.stdout and "temperature 0.3" in proc.stdout
    assert "sar-scale demo summary" in proc.stdout and "dashboard --workdir" in proc.stdout
