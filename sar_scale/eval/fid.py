"""FID between two image sets with a user-supplied, local TorchScript Inception feature extractor.

Nothing is downloaded: pass the file that clean-fid / StyleGAN3 publish
(``inception-2015-12-05.pt``, a TorchScript module called as ``net(x, return_features=True)`` on
float images in [0, 255], returning 2048-d pool features) or any TorchScript module mapping
``[B, 3, S, S]`` images to ``[B, D]`` features. Images are resized to ``S`` with PIL bicubic
(clean-fid's choice) before the network sees them.

FID = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Heusel et al. 2017), with the matrix
square root from ``scipy.linalg.sqrtm``.

Shape legend: B batch, D feature width, N images.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from tqdm import tqdm

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INPUT_RANGES = ("0-255", "0-1", "-1-1")


class FIDUnavailable(RuntimeError):
    """No feature-extractor weights were given: the FID suite is skipped, with this message."""


@dataclass
class FeatureStats:
    """Mean and covariance of features over a set of images."""

    mu_D: np.ndarray
    sigma_DD: np.ndarray
    count: int

    @classmethod
    def from_features(cls, feats_ND: np.ndarray) -> FeatureStats:
        feats = np.asarray(feats_ND, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[0] < 2:
            raise ValueError(f"need at least 2 feature vectors [N, D] for a covariance, got {feats.shape}")
        return cls(feats.mean(0), np.cov(feats, rowvar=False), feats.shape[0])


def frechet_distance(a: FeatureStats, b: FeatureStats, eps: float = 1e-6) -> float:
    """Fréchet distance between two Gaussians fitted to features.

    A singular product (few samples, low-rank covariance) gets ``eps`` added to both diagonals, as
    in the reference implementations; tiny imaginary parts from numerical error are dropped, large
    ones are an error.
    """
    mu1, mu2 = np.atleast_1d(a.mu_D), np.atleast_1d(b.mu_D)
    s1, s2 = np.atleast_2d(a.sigma_DD), np.atleast_2d(b.sigma_DD)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"feature widths differ: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product is handled just below, not an error
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        logger.warning("FID: singular covariance product; adding %g to the diagonals", eps)
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: matrix square root has a large imaginary part "
                             f"({np.max(np.abs(covmean.imag)):.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted), so a run is reproducible."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) under {root}")
    return files


class FeatureExtractor:
    """A TorchScript feature network loaded from a local file."""

    def __init__(self, path: str | Path | None, image_size: int = 299, input_range: str = "0-255",
                 device: str = "cpu"):
        if path is None:
            raise FIDUnavailable(
                "FID skipped: no Inception weights given. Pass --inception PATH to a local TorchScript "
                "feature extractor (e.g. clean-fid/StyleGAN3's inception-2015-12-05.pt); nothing is "
                "downloaded.")
        p = Path(path)
        if not p.is_file():
            raise FIDUnavailable(f"FID skipped: Inception weights file not found: {p}")
        if input_range not in INPUT_RANGES:
            raise ValueError(f"input_range must be one of {INPUT_RANGES}, got {input_range!r}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        try:
            self.net = torch.jit.load(str(p), map_location=device).eval()
        except RuntimeError as e:
            raise ValueError(f"{p}: not a TorchScript module ({e.__class__.__name__}: "
                             f"{str(e).splitlines()[0]})") from None
        self.path, self.image_size, self.input_range, self.device = p, image_size, input_range, device
        self._return_features: bool | None = None  # probed on the first batch

    def _prepare(self, images: Sequence[Image.Image]) -> torch.Tensor:
        s = self.image_size
        arr = np.stack([np.asarray(im.convert("RGB").resize((s, s), Image.BICUBIC), dtype=np.float32)
                        for im in images])
        x_B3SS = torch.from_numpy(arr).permute(0, 3, 1, 2).to(self.device)
        if self.input_range == "0-1":
            x_B3SS = x_B3SS / 255.0
        elif self.input_range == "-1-1":
            x_B3SS = x_B3SS / 127.5 - 1.0
        return x_B3SS

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        x = self._prepare(images)
        if self._return_features is None:
            # clean-fid/StyleGAN3's detector wants return_features=True (else it returns logits)
            try:
                out = self.net(x, return_features=True)
                self._return_features = True
            except (RuntimeError, TypeError):
                out = self.net(x)
                self._return_features = False
        else:
            out = self.net(x, return_features=True) if self._return_features else self.net(x)
        if isinstance(out, tuple | list):
            out = out[0]
        if out.dim() > 2:
            out = out.flatten(1)
        return out.double().cpu().numpy()

    def stats(self, images: Iterable[Image.Image | str | Path], batch_size: int = 32,
              desc: str = "features", total: int | None = None, progress: bool = True) -> FeatureStats:
        feats: list[np.ndarray] = []
        batch: list[Image.Image] = []

        def flush() -> None:
            if batch:
                feats.append(self(batch))
                batch.clear()

        for item in tqdm(images, desc=desc, total=total, unit="img", disable=not progress):
            if isinstance(item, str | Path):
                with Image.open(item) as im:
                    item = im.convert("RGB")
            batch.append(item)
            if len(batch) == batch_size:
                flush()
        flush()
        if not feats:
            raise ValueError(f"{desc}: no images")
        return FeatureStats.from_features(np.concatenate(feats))


def fid_from_images(extractor: FeatureExtractor, images_a: Sequence[Image.Image | str | Path],
                    images_b: Sequence[Image.Image | str | Path], batch_size: int = 32,
                    progress: bool = True) -> dict[str, float | int]:
    """FID between two image collections (PIL images or file paths)."""
    sa = extractor.stats(images_a, batch_size, "FID: generated", len(images_a), progress)
    sb = extractor.stats(images_b, batch_size, "FID: reference", len(images_b), progress)
    if sa.count < sa.mu_D.shape[0] or sb.count < sb.mu_D.shape[0]:
        logger.warning("FID with fewer images (%d, %d) than feature dims (%d) is biased and noisy; "
                       "use thousands of images for a number comparable with papers",
                       sa.count, sb.count, sa.mu_D.shape[0])
    return {"fid": frechet_distance(sa, sb), "n_generated": sa.count, "n_reference": sb.count,
            "feature_dim": int(sa.mu_D.shape[0])}
