"""A deterministic detector for "shapes" images: the evaluator that needs no learned model.

Generated images are scored by what is visibly in them, so the checks follow the generator's own
definitions (sar_scale.data.synthetic): the background is the border's median color; object
pixels are those that differ clearly from it; the largest connected blob is the object. Its
circular-mean hue picks the nearest palette color, its centroid falls in the generator's position
bands (``position_of``), and its fill ratio inside its bounding box separates triangle (~0.5),
circle (~0.785) and square (~1.0). Nothing is fitted, so the same image always gets the same
answer and a result can be audited by hand.

Shape legend: H, W image size; rgb_HW3 uint8 pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from sar_scale.data.synthetic import COLOR_HUES, SHAPE_FILL, position_of

# Object pixels differ from the background by more than this (max over channels, 0-255). The
# palette colors are >= ~110 away from any light background in at least one channel; VQ/model
# blur and noise stay well under it.
DIFF_THRESHOLD = 60
# A blob smaller than this fraction of the image is noise, not an object (the generator's objects
# cover ~1/9 of the short side squared, i.e. >= ~3% of the image).
MIN_OBJECT_FRACTION = 0.004
# Fill-ratio cut points. Ideal fills are 0.5 / pi/4 / 1.0, but decoded (VQ) images are blurred:
# a square's corners round off, a triangle's thin apex thickens. Measured on demo-VQ
# reconstructions of generator images: triangles 0.47-0.66, circles 0.72-0.84, squares 0.84-0.98
# at 64 px (0.88-0.98 at 128 px). The cuts sit where those ranges meet; the generator's own
# images (triangle <= 0.58, circle 0.73-0.83, square >= 0.95 at 64 px) stay clear of them.
FILL_CUTS: list[tuple[float, str]] = [(0.68, "triangle"), (0.85, "circle")]
_FILLS = sorted(SHAPE_FILL.items(), key=lambda kv: kv[1])
assert [name for _, name in FILL_CUTS] == [n for n, _ in _FILLS[:-1]]


@dataclass
class Detection:
    """What the detector saw. Fields are None when there is no usable object."""

    color: str | None
    shape: str | None
    position: str | None
    hue: float | None = None
    fill: float | None = None
    centroid: tuple[float, float] | None = None  # (x, y) pixels
    area_fraction: float = 0.0
    blobs: int = 0  # connected object blobs above the noise floor

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _to_rgb_array(image: Image.Image | np.ndarray | str | Path) -> np.ndarray:
    if isinstance(image, str | Path):
        with Image.open(image) as im:
            image = im.convert("RGB")
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be H x W x 3 RGB, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {arr.dtype}")
    return arr


def estimate_background(rgb_HW3: np.ndarray, border: int = 2) -> np.ndarray:
    """Median color of a ``border``-pixel frame: objects never touch the generator's image edge."""
    h, w, _ = rgb_HW3.shape
    b = max(1, min(border, h // 4, w // 4))
    frame = np.concatenate([rgb_HW3[:b].reshape(-1, 3), rgb_HW3[-b:].reshape(-1, 3),
                            rgb_HW3[:, :b].reshape(-1, 3), rgb_HW3[:, -b:].reshape(-1, 3)])
    return np.median(frame, axis=0)


def nearest_color(hue_deg: float) -> str:
    """Palette color whose hue is circularly nearest."""
    def dist(name: str) -> float:
        d = abs(COLOR_HUES[name] - hue_deg) % 360.0
        return min(d, 360.0 - d)

    return min(COLOR_HUES, key=dist)


def shape_from_fill(fill: float) -> str:
    for cut, name in FILL_CUTS:
        if fill < cut:
            return name
    return _FILLS[-1][0]


def _circular_mean_hue(hsv_N3: np.ndarray) -> float:
    """Saturation-weighted circular mean of PIL HSV hues (0-255 -> degrees): saturated pixels
    say more about the hue than washed-out edge pixels, and red wraps around 0/360."""
    ang = hsv_N3[:, 0].astype(np.float64) / 256.0 * 2 * np.pi
    weight = hsv_N3[:, 1].astype(np.float64)
    if weight.sum() <= 0:
        weight = np.ones_like(weight)
    x, y = (weight * np.cos(ang)).sum(), (weight * np.sin(ang)).sum()
    return float(np.degrees(np.arctan2(y, x)) % 360.0)


def detect(image: Image.Image | np.ndarray | str | Path, threshold: int = DIFF_THRESHOLD) -> Detection:
    """Classify the single object of a shapes image (color, shape, position)."""
    rgb = _to_rgb_array(image)
    h, w, _ = rgb.shape
    bg = estimate_background(rgb)
    diff_HW = np.abs(rgb.astype(np.int16) - bg.astype(np.int16)).max(axis=2)
    fg_HW = diff_HW > threshold
    labels_HW, n = ndimage.label(fg_HW)
    if n == 0:
        return Detection(None, None, None)
    sizes = ndimage.sum(fg_HW, labels_HW, index=np.arange(1, n + 1))
    min_px = MIN_OBJECT_FRACTION * h * w
    blobs = int((sizes >= min_px).sum())
    biggest = int(np.argmax(sizes)) + 1
    if sizes[biggest - 1] < min_px:
        return Detection(None, None, None, area_fraction=float(fg_HW.mean()), blobs=0)
    # fill holes so a speckled interior does not read as a lower fill ratio
    obj_HW = ndimage.binary_fill_holes(labels_HW == biggest)
    ys, xs = np.nonzero(obj_HW)
    area = float(len(xs))
    bbox_area = float((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    fill = area / bbox_area
    cx, cy = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5  # pixel centers, as the generator's geometry
    hsv_HW3 = np.asarray(Image.fromarray(rgb).convert("HSV"))
    hue = _circular_mean_hue(hsv_HW3[obj_HW])
    return Detection(color=nearest_color(hue), shape=shape_from_fill(fill), position=position_of(cx, cy, w, h),
                     hue=round(hue, 1), fill=round(fill, 3), centroid=(round(cx, 1), round(cy, 1)),
                     area_fraction=round(area / (h * w), 4), blobs=blobs)


def score(det: Detection, color: str, shape: str, position: str) -> dict[str, bool]:
    """Per-attribute correctness and all-three for one image against its prompt."""
    ok = {"color": det.color == color, "shape": det.shape == shape, "position": det.position == position}
    ok["all"] = all(ok.values())
    return ok
