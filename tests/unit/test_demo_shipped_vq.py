"""The shipped demo VQ (sar_scale/assets/demo_vq/, made by scripts/ship_demo_vq.py) is the one a first
`sar-scale demo` would train: same config, same default images, so the demo may start from it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sar_scale.demo import SHIPPED_VQ, SHIPPED_VQ_FILES, Demo, StageResult, shipped_vq_key

REMAKE = "the shipped demo VQ no longer matches the repository: run `.venv/bin/python scripts/ship_demo_vq.py`"


def _record() -> dict:
    return json.loads((SHIPPED_VQ / "shipped.json").read_text())


def test_shipped_vq_was_made_with_the_repos_config_and_demo_defaults(tmp_path):
    assert all((SHIPPED_VQ / n).is_file() for n in SHIPPED_VQ_FILES) and shipped_vq_key()
    rec = _record()
    assert rec["vq_config"] == Demo.vq_config(), REMAKE
    d = Demo(tmp_path)
    assert (rec["images"], rec["size"], rec["seed"], rec["corrupt"], rec["steps"]) == \
        (d.images, d.size, d.seed, d.corrupt, d.vq_steps), REMAKE
    summary = json.loads((SHIPPED_VQ / "train_summary.json").read_text())
    assert summary["heldout"]["psnr"] > 23 and summary["steps"] == rec["vq_config"]["steps"]


@pytest.mark.slow
def test_first_demo_uses_the_shipped_vq_and_it_reconstructs(tmp_path, one_thread):
    from sar_scale.data.synthetic import main as synth_main
    from sar_scale.tokenizers.vq import load_vq

    rec = _record()
    demo = Demo(tmp_path / "w", cache_dir=tmp_path / "cache", quiet=True)
    shapes = demo.p("data", "shapes")
    assert synth_main(["--out", str(shapes), "--n", str(demo.images), "--seed", str(demo.seed),
                       "--size", str(demo.size), "--corrupt", str(demo.corrupt)]) == 0
    assert demo.vq_key() == rec["key"], REMAKE
    demo.results = {"vq": StageResult("vq")}
    out = demo.stage_vq()  # no training: the shipped files, copied into the workdir
    assert demo.results["vq"].status == "shipped"
    assert (tmp_path / "w" / "vq" / "model.safetensors").is_file()
    assert not (demo.cache_dir / "demo_vq" / rec["key"]).exists()  # the cache keeps trained VQs only
    vq = load_vq(out)
    img = np.array(Image.open(sorted(shapes.glob("[0-9]*.png"))[0]).convert("RGB").resize((64, 64)))
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        y = vq.decode(vq.encode(x))
    mse = float(((y.clamp(-1, 1) - x) ** 2).mean()) / 4  # in [0, 1] units
    assert 10 * np.log10(1 / mse) > 20
    trained = Demo(tmp_path / "w", cache_dir=tmp_path / "cache2", quiet=True, train_vq=True)
    assert shipped_vq_key() == trained.vq_key()  # --train-vq is what differs, not the key
