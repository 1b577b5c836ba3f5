"""`sar-scale eval` end to end on a tiny (random) export: tables, results.json, MLflow, errors."""

from __future__ import annotations

import json

import pytest
import torch

from sar_scale.eval.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A text- and a class-conditional export (debug FMT, random demo-small VQ, tiny T5) + shards."""
    from sar_scale.export.config import SourceInfo
    from sar_scale.export.release import write_export
    from sar_scale.models import build_model
    from sar_scale.tokenizers.text import build_tiny_text_encoder
    from sar_scale.tokenizers.vq import build_vq, save_vq
    from sar_scale.training.debug_data import write_debug_shards

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    vq = save_vq(build_vq("demo-small"), root / "vq")
    te = build_tiny_text_encoder(root / "te", kind="t5", width=32, layers=1, heads=2, max_length=16)
    text_model = build_model("debug", cond="text", vocab_size=1024, text_dim=32, max_text_len=16)
    class_model = build_model("debug", vocab_size=1024)
    write_export(root / "text", text_model.state_dict(), text_model.config, vq=vq, text_encoder=te,
                 resolutions=[32], default_resolution=32, source=SourceInfo(mlflow_run_id="f" * 32))
    write_export(root / "class", class_model.state_dict(), class_model.config, vq=vq, resolutions=[32])
    write_debug_shards(root / "shards", num_samples=24, resolutions=(32,), vocab_size=1024, downsample=8)
    return root


def test_shapes_and_nll_suites(tiny, tmp_path, capsys):
    out = tmp_path / "eval"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(["--model", str(tiny / "text"), "--suite", "shapes", "nll", "--plans", "raster-ar", "random-4",
               "--shards", str(tiny / "shards"), "--max-samples", "16", "--batch-size", "75", "--out", str(out),
               "--mlflow-uri", uri, "--quiet", "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0, text
    res = json.loads((out / "results.json").read_text())
    shapes = res["shapes"]
    # the two plans asked for, plus the export's default recipe (random-16-cosine) which is always measured
    assert [p["plan"] for p in shapes["plans"]] == ["raster-16-ar", "random-4-cosine", "random-16-cosine"]
    assert shapes["default_plan"] == "random-16-cosine" and shapes["grid"] == [4, 4]
    assert all(p["n"] == 75 and 0.0 <= p["acc_all"] <= 1.0 for p in shapes["plans"])
    assert (out / "shapes" / "random-4-cosine" / "grid.png").is_file()
    assert [p["samples"] for p in res["nll"]["plans"]] == [16, 16, 16]
    assert all(6.0 < p["nll"] < 8.0 for p in res["nll"]["plans"])  # ~ln(1024) = 6.93 for a random model
    assert "shapes accuracy @ 32px" in text and "token NLL" in text and "raster-16-ar" in text
    # logged to MLflow: the export's run id is not in this store, so a new eval run holds everything
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(res["mlflow"]["run_id"])
    m = run.data.metrics
    assert "eval/shapes/raster-16-ar/all" in m and "eval/shapes/default/all" in m and "eval/nll/random-4-cosine" in m
    arts = [a.path for a in client.list_artifacts(run.info.run_id, "eval/shapes")]
    assert "eval/shapes/table.txt" in arts and "eval/shapes/random-4-cosine" in arts


def test_fid_is_skipped_without_weights_and_errors_are_clear(tiny, tmp_path, capsys, monkeypatch):
    from sar_scale.eval import fid as fid_mod

    monkeypatch.setattr(fid_mod, "DEFAULT_NETWORK_PACKAGE", "no_such_fid_package")  # the [fid] extra not installed
    rc = main(["--model", str(tiny / "text"), "--suite", "fid", "--out", str(tmp_path / "e"), "--no-mlflow", "--quiet"])
    assert rc == 0
    assert "FID skipped: the default Inception network is not installed" in capsys.readouterr().out
    assert json.loads((tmp_path / "e" / "results.json").read_text())["fid"]["skipped"]
    assert main(["--model", str(tiny / "text"), "--suite", "nll", "--no-mlflow", "--out", str(tmp_path / "n")]) == 2
    assert "--shards" in capsys.readouterr().err
    assert main(["--model", str(tiny / "class"), "--suite", "shapes", "--no-mlflow", "--out", str(tmp_path / "c")]) == 2
    assert "text-conditional" in capsys.readouterr().err
    assert main(["--model", str(tiny / "text"), "--resolution", "36", "--no-mlflow", "--out", str(tmp_path / "r")]) == 2
    assert "multiple of the VQ downsample 8" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing"), "--no-mlflow"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["--model", str(tiny / "text"), "--plans", "sideways-3", "--no-mlflow"]) == 2


def test_fid_suite_with_a_scripted_feature_net(tiny, tmp_path, capsys):
    from PIL import Image

    class Net(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = x.mean(dim=(2, 3))
            return torch.cat([m, x.std(dim=(2, 3))], 1)

    weights = tmp_path / "feat.pt"
    torch.jit.script(Net()).save(str(weights))
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(6):
        Image.new("RGB", (32, 32), (200, 40 * i, 40)).save(ref / f"{i}.png")
        (ref / f"{i}.txt").write_text("a red circle on the left")
    rc = main(["--model", str(tiny / "class"), "--suite", "fid", "--inception", str(weights), "--reference", str(ref),
               "--inception-size", "16", "--fid-images", "6", "--batch-size", "4", "--out", str(tmp_path / "f"),
               "--no-mlflow", "--quiet"])
    assert rc == 0
    fid = json.loads((tmp_path / "f" / "results.json").read_text())["fid"]
    assert fid["n_generated"] == fid["n_reference"] == 6 and fid["feature_dim"] == 6 and fid["fid"] > 0
    assert len(list((tmp_path / "f" / "fid" / "generated").glob("*.png"))) == 6
    assert "FID" in capsys.readouterr().out and "N=6 vs 6 real" in fid_text(fid)
    assert main(["--model", str(tiny / "class"), "--suite", "fid", "--inception", str(weights), "--no-mlflow",
                 "--out", str(tmp_path / "g")]) == 2
    assert "--reference" in capsys.readouterr().err


def fid_text(res):
    from sar_scale.eval.fid import format_fid

    return format_fid(res)
