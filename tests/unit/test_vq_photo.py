"""Round trip of a real photo (scikit-image's astronaut, shipped in the wheel) through a VQ that
is quickly trained here on *other* photos, so the astronaut is truly held out."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from sar_scale.tokenizers.train import VQTrainConfig, to_model_range, to_uint8, train_vq
from sar_scale.tokenizers.vq import load_vq


def _psnr(a_u8: torch.Tensor, b_u8: torch.Tensor) -> float:
    mse = (a_u8.float() - b_u8.float()).div(255).pow(2).mean().item()
    return 10 * math.log10(1 / mse)


@pytest.mark.slow
def test_astronaut_roundtrip_beats_trivial_baseline(tmp_path, record_property):
    skdata = pytest.importorskip("skimage.data")
    rng = np.random.default_rng(0)
    train_dir = tmp_path / "crops"
    train_dir.mkdir()
    for name in ("chelsea", "coffee", "rocket"):
        img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        img = img.resize((img.width * 96 // img.height, 96), Image.BICUBIC)
        arr = np.asarray(img)
        for i in range(40):
            y, x = rng.integers(0, arr.shape[0] - 32), rng.integers(0, arr.shape[1] - 32)
            Image.fromarray(arr[y:y + 32, x:x + 32]).save(train_dir / f"{name}_{i:02d}.png")

    # demo-small's code path at test scale (half width, downsample 4), one thread: a shared CPU.
    cfg = VQTrainConfig(data=str(train_dir), out=str(tmp_path / "vq"), image_size=32, steps=250,
                        batch_size=16, holdout=0.05, warmup_steps=20, threads=1,
                        vq={"ch": 16, "ch_mult": [1, 1, 2], "norm_groups": 4, "z_channels": 32,
                            "codebook_size": 256})
    threads = torch.get_num_threads()
    try:
        train_vq(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    vq = load_vq(tmp_path / "vq")

    astro = Image.fromarray(skdata.astronaut()).resize((64, 64), Image.BICUBIC)
    x_u8 = torch.from_numpy(np.asarray(astro).copy()).permute(2, 0, 1)[None]
    codes = vq.encode(to_model_range(x_u8))
    assert codes.shape == (1, 16, 16)
    rec_u8 = to_uint8(vq.decode(codes))
    psnr = _psnr(rec_u8, x_u8)
    flat_u8 = x_u8.float().mean((2, 3), keepdim=True).round().expand_as(x_u8)  # best constant image
    baseline = _psnr(flat_u8, x_u8)
    record_property("astronaut_psnr_db", round(psnr, 2))
    record_property("constant_image_psnr_db", round(baseline, 2))
    print(f"astronaut 64x64 through a 250-step test-scale VQ: PSNR {psnr:.2f} dB "
          f"(constant-colour baseline {baseline:.2f} dB)")
    assert psnr > baseline + 1.0
