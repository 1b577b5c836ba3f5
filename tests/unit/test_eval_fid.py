"""FID math against closed forms, and the feature path with a tiny TorchScript net built here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sar_scale.eval.fid import (
    FeatureExtractor,
    FeatureStats,
    FIDUnavailable,
    fid_from_images,
    frechet_distance,
    list_images,
)


def test_frechet_distance_closed_form_diagonal():
    """For diagonal covariances FID = |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(FeatureStats(mu1, np.diag(a), 10), FeatureStats(mu2, np.diag(b), 10))
    assert got == pytest.approx(want, rel=1e-9)


def test_frechet_distance_general_and_symmetric():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6))
    y = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6)) * 0.5 + 0.3
    sx, sy = FeatureStats.from_features(x), FeatureStats.from_features(y)
    assert frechet_distance(sx, sx) == pytest.approx(0.0, abs=1e-8)
    d_xy, d_yx = frechet_distance(sx, sy), frechet_distance(sy, sx)
    assert d_xy > 0.5 and d_xy == pytest.approx(d_yx, rel=1e-6)
    # rotation invariance: rotating both feature sets leaves FID unchanged
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert frechet_distance(FeatureStats.from_features(x @ q), FeatureStats.from_features(y @ q)) == \
        pytest.approx(d_xy, rel=1e-6)


def test_singular_covariances_and_bad_shapes():
    x = np.zeros((5, 4))
    x[:, 0] = np.arange(5)  # rank-1 covariance
    s = FeatureStats.from_features(x)
    assert np.isfinite(frechet_distance(s, s))
    with pytest.raises(ValueError, match="widths differ"):
        frechet_distance(s, FeatureStats.from_features(np.ones((3, 2))))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats.from_features(np.ones((1, 3)))


class _StyleGANLikeNet(torch.nn.Module):
    """Same calling convention as clean-fid's inception-2015-12-05.pt: (x in 0..255, return_features)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        f = torch.relu(self.conv(x / 255.0)).mean(dim=(2, 3))
        return f if return_features else self.head(f)


class _PlainNet(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x.mean(dim=(2, 3))[:, 0], x.mean(dim=(2, 3))[:, 2], x.std(dim=(2, 3))[:, 1]], 1)


def _script_save(cls_name: str, path) -> None:
    """Script and save one of the nets above in a fresh interpreter: earlier in-process DeepSpeed runs
    in the same pytest session leave torch state behind that makes ``ScriptModule.save`` fail."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    code = (f"import sys, torch; sys.path.insert(0, {str(repo)!r}); "
            f"from tests.unit.test_eval_fid import {cls_name}; torch.jit.script({cls_name}()).save({str(path)!r})")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo)


def _folder(path, colors, n=12, seed=0):
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = np.array(colors[i % len(colors)], np.float32)
        arr = np.clip(base + rng.normal(0, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(path / f"{i:03d}.png")
    return path


def test_fid_with_scripted_feature_nets(tmp_path):
    weights = tmp_path / "tiny_inception.pt"
    _script_save("_StyleGANLikeNet", weights)
    red = _folder(tmp_path / "red", [(200, 40, 40), (180, 60, 50)])
    red2 = _folder(tmp_path / "red2", [(200, 40, 40), (180, 60, 50)], seed=1)
    blue = _folder(tmp_path / "blue", [(40, 40, 200), (50, 60, 180)])
    ext = FeatureExtractor(weights, image_size=32)
    same = fid_from_images(ext, list_images(red), list_images(red), progress=False)
    near = fid_from_images(ext, list_images(red), list_images(red2), progress=False)
    far = fid_from_images(ext, list_images(red), list_images(blue), progress=False)
    assert ext._return_features is True and same["feature_dim"] == 8
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < near["fid"] < far["fid"]
    plain = tmp_path / "plain.pt"
    _script_save("_PlainNet", plain)
    ext2 = FeatureExtractor(plain, image_size=16, input_range="0-1")
    res = fid_from_images(ext2, [Image.open(p) for p in list_images(red)], list_images(blue), progress=False)
    assert ext2._return_features is False and res["feature_dim"] == 3 and res["fid"] > 0.1


def test_missing_weights_skip_with_a_clear_message(tmp_path):
    with pytest.raises(FIDUnavailable, match="--inception"):
        FeatureExtractor(None)
    with pytest.raises(FIDUnavailable, match="not found"):
        FeatureExtractor(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torchscript archive")
    with pytest.raises(ValueError, match="not a TorchScript"):
        FeatureExtractor(bad)
    with pytest.raises(FileNotFoundError, match="no images"):
        (tmp_path / "empty").mkdir()
        list_images(tmp_path / "empty")
