"""Aspect-ratio buckets at about constant token count (PixArt / Lumina style).

A bucket is a pixel size ``(h_px, w_px)`` whose token grid ``(h_px/ds, w_px/ds)`` has about the
base grid's token count ``(base_res/ds)**2``. Every image goes to the bucket with the nearest log
aspect ratio, is resized to cover it and center-cropped.

Resolution consistency: for a curriculum (e.g. 256 then 512) an image must land in the *same*
aspect ratio at every stage, so stage 2's grid is stage 1's scaled up. Buckets are therefore built
once on a reference grid (the smallest resolution, ``ref_res``) and scaled by an integer factor;
the ratios are then identical at every resolution and ``nearest_bucket`` picks the same one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from PIL import Image

Bucket = tuple[int, int]  # (h_px, w_px)


def _grid_buckets(grid: int, max_ratio: float) -> list[tuple[int, int]]:
    """Token grids ``(h, w)`` with ``h*w <= grid**2`` and ratio <= max_ratio, tallest first.

    Lumina's construction: for each short side ``s <= grid`` take the longest side within the
    budget, then mirror, so wide and tall buckets are exact transposes of each other.
    """
    budget = grid * grid
    wide = {(s, budget // s) for s in range(1, grid + 1) if (budget // s) / s <= max_ratio + 1e-9}
    both = wide | {(w, h) for h, w in wide}
    return sorted(both, key=lambda hw: (-hw[0] / hw[1], -hw[0] * hw[1]))


def bucket_list(base_res: int, downsample: int = 16, max_ratio: float = 4.0,
                ref_res: int | None = None) -> list[Bucket]:
    """Pixel buckets ``(h_px, w_px)`` for ``base_res``, sorted from tallest to widest.

    ``ref_res`` (default ``base_res``): build on that resolution's token grid and scale up, so the
    lists for several resolutions have identical aspect ratios (pass the smallest one).
    """
    if downsample < 1:
        raise ValueError(f"downsample must be >= 1, got {downsample}")
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    ref = base_res if ref_res is None else ref_res
    for field, v in (("base_res", base_res), ("ref_res", ref)):
        if v <= 0 or v % downsample:
            raise ValueError(f"{field}={v} must be a positive multiple of the VQ downsample {downsample}")
    if base_res % ref:
        raise ValueError(f"base_res={base_res} must be an integer multiple of ref_res={ref} so the "
                         "buckets are scaled copies")
    scale = base_res // ref
    grids = _grid_buckets(ref // downsample, max_ratio)
    return [(h * scale * downsample, w * scale * downsample) for h, w in grids]


def bucket_table(resolutions: Iterable[int], downsample: int = 16,
                 max_ratio: float = 4.0) -> dict[int, list[Bucket]]:
    """Buckets for every resolution of a curriculum, aligned (same index = same aspect ratio)."""
    res = sorted({int(r) for r in resolutions})
    if not res:
        raise ValueError("bucket_table: need at least one resolution")
    return {r: bucket_list(r, downsample, max_ratio, ref_res=res[0]) for r in res}


def nearest_bucket(w: int, h: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket with the nearest log aspect ratio to a ``w x h`` image (ties: the larger area)."""
    if w <= 0 or h <= 0:
        raise ValueError(f"nearest_bucket: image size must be positive, got {w}x{h}")
    if not buckets:
        raise ValueError("nearest_bucket: empty bucket list")
    target = math.log(h / w)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - target), 12), -b[0] * b[1]))


def bucket_index(w: int, h: int, buckets: Sequence[Bucket]) -> int:
    return list(buckets).index(nearest_bucket(w, h, buckets))


def grid_of(bucket: Bucket, downsample: int) -> tuple[int, int]:
    """Token grid ``(h_tok, w_tok)`` of a pixel bucket."""
    return bucket[0] // downsample, bucket[1] // downsample


def bucket_name(grid: tuple[int, int]) -> str:
    """``(12, 20)`` -> ``"12x20"`` (the manifest's per-bucket count key)."""
    return f"{grid[0]}x{grid[1]}"


def resize_center_crop(img: Image.Image, bucket: Bucket,
                       resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """Scale ``img`` to cover ``bucket`` (keeping its aspect ratio), then crop the center."""
    bh, bw = bucket
    w, h = img.size
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    # reducing_gap: a fast box pre-shrink before the bicubic pass for large downscales.
    out = img.resize((nw, nh), resample=resample, reducing_gap=3.0)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    return out.crop((left, top, left + bw, top + bh))
