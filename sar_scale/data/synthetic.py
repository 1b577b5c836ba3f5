"""The "shapes" dataset: compositional text-to-image data whose correctness a detector can check.

Each image is a light plain background with one (or, in two-objects mode, two) flat-colored shape;
the caption names its color, shape and position. Because the attributes are exactly known
(``labels.jsonl``) and visually unambiguous (separated hues, fill ratios of the bounding box
circle ~0.785 / square 1.0 / triangle 0.5, centroid bands), a trained model's samples can be
scored without any learned evaluator. It is written as an ordinary image folder with same-stem
``.txt`` captions, so the data pipeline treats it like any user folder.

Positions: the object's pixel centroid lies in the outer 35% band on that side (and the middle
30% band of the other axis), or in the middle 30% of both axes for ``center``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

logger = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "yellow": (235, 200, 20),
    "green": (30, 165, 55),
    "blue": (35, 75, 225),
    "purple": (150, 45, 200),
}
# Hue in degrees (0-360) of each color above: at least ~45 degrees apart, so a detector can
# classify by nearest hue.
COLOR_HUES: dict[str, float] = {}
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
# Fill ratio of the shape inside its bounding box (what a detector can use to tell shapes apart).
SHAPE_FILL: dict[str, float] = {"circle": float(np.pi / 4), "square": 1.0, "triangle": 0.5}
# (w, h) ratios of the generated images: square, 3:5 (portrait), 5:3 (landscape).
ASPECTS: tuple[tuple[int, int], ...] = ((1, 1), (3, 5), (5, 3))
BAND = 0.35  # outer band for left/right/top/bottom
MID = (0.35, 0.65)  # middle 30% band
OBJECT_FRACTION = 1 / 3  # object size relative to the short side

TEMPLATES: tuple[str, ...] = (
    "a {color} {shape} {where}",
    "{color} {shape}, {side}",
    "a picture of a {color} {shape} {where}",
    "{side}: a {color} {shape}",
)
_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
          "center": "in the center"}
_SIDE = {"left": "left side", "right": "right side", "top": "top side", "bottom": "bottom side",
         "center": "center"}


def _hue(rgb: tuple[int, int, int]) -> float:
    import colorsys

    h, _, _ = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    return h * 360.0


COLOR_HUES.update({name: _hue(rgb) for name, rgb in COLORS.items()})


def position_of(cx: float, cy: float, w: int, h: int) -> str | None:
    """The position word for a centroid, or None when it lies in no band (ambiguous)."""
    fx, fy = cx / w, cy / h
    mid_x, mid_y = MID[0] <= fx <= MID[1], MID[0] <= fy <= MID[1]
    if mid_x and mid_y:
        return "center"
    if mid_y and fx < BAND:
        return "left"
    if mid_y and fx > 1 - BAND:
        return "right"
    if mid_x and fy < BAND:
        return "top"
    if mid_x and fy > 1 - BAND:
        return "bottom"
    return None


def caption_for(objects: list[dict[str, Any]], template: int) -> str:
    parts = []
    for o in objects:
        t = TEMPLATES[template % len(TEMPLATES)]
        parts.append(t.format(color=o["color"], shape=o["shape"], where=_WHERE[o["position"]],
                              side=_SIDE[o["position"]]))
    return " and ".join(parts)


@dataclass
class ShapesConfig:
    """Generator options (CLI flags mirror these)."""

    n: int = 1000
    seed: int = 0
    size: int = 160  # short side in pixels
    two_objects: bool = False
    image_format: str = "png"  # png | jpg
    corrupt: int = 0  # how many deliberately broken files to add (reject-path demo)


def _shape_bbox(shape: str, cx: float, cy: float, s: float) -> tuple[float, float, float, float]:
    """Bounding box whose *pixel centroid* is (cx, cy) for a shape of size s."""
    if shape == "triangle":  # apex up; the centroid of a triangle is 2/3 down from the apex
        return cx - s / 2, cy - 2 * s / 3, cx + s / 2, cy + s / 3
    return cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float],
          rgb: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=rgb)


def _sample_center(rng: np.random.Generator, position: str, w: int, h: int,
                   box_extent: tuple[float, float, float, float]) -> tuple[float, float]:
    """Centroid inside the position's band, keeping the whole shape inside the image.

    ``box_extent`` = (left, top, right, bottom) distances from the centroid to the bbox edges.
    """
    el, et, er, eb = box_extent
    margin = 2.0

    def rng_in(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi)) if hi > lo else (lo + hi) / 2

    xs = {"left": (el + margin, BAND * w - 1), "right": ((1 - BAND) * w + 1, w - er - margin)}
    ys = {"top": (et + margin, BAND * h - 1), "bottom": ((1 - BAND) * h + 1, h - eb - margin)}
    mid_x, mid_y = (MID[0] * w + 1, MID[1] * w - 1), (MID[0] * h + 1, MID[1] * h - 1)
    cx = rng_in(*xs.get(position, mid_x))
    cy = rng_in(*ys.get(position, mid_y))
    return cx, cy


def make_image(rng: np.random.Generator, size: int = 160, two_objects: bool = False,
               aspect: tuple[int, int] | None = None,
               attrs: tuple[str, str, str] | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """One shapes image and its labels (objects with shape/color/position/bbox/centroid);
    ``attrs`` = (color, shape, position) fixes the single object's class."""
    aw, ah = aspect or ASPECTS[int(rng.integers(len(ASPECTS)))]
    if aw >= ah:
        h, w = size, round(size * aw / ah)
    else:
        w, h = size, round(size * ah / aw)
    # light plain background: a light gray with a slight random tint (low saturation)
    base = rng.uniform(215, 248)
    bg = tuple(int(np.clip(base + rng.uniform(-8, 8), 200, 255)) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    n_obj = 2 if two_objects else 1
    objects: list[dict[str, Any]] = []
    if attrs is not None and (two_objects or attrs[0] not in COLORS or attrs[1] not in SHAPES
                              or attrs[2] not in POSITIONS):
        raise ValueError(f"attrs must be one (color, shape, position) of {list(COLORS)} x {SHAPES} x {POSITIONS}, "
                         f"got {attrs}")
    positions = list(rng.choice(len(POSITIONS), size=n_obj, replace=False))
    boxes: list[tuple[float, float, float, float]] = []
    for pi in positions:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        position = POSITIONS[int(pi)]
        if attrs is not None:
            color, shape, position = attrs
        s = min(w, h) * OBJECT_FRACTION * float(rng.uniform(0.9, 1.1))
        for _attempt in range(50):
            cx, cy = _sample_center(rng, position, w, h,
                                    (s / 2, 2 * s / 3 if shape == "triangle" else s / 2, s / 2,
                                     s / 3 if shape == "triangle" else s / 2))
            box = _shape_bbox(shape, cx, cy, s)
            if all(box[2] + 2 < b[0] or b[2] + 2 < box[0] or box[3] + 2 < b[1] or b[3] + 2 < box[1]
                   for b in boxes):
                break
            s *= 0.95  # two objects that collide: shrink a little and retry
        boxes.append(box)
        _draw(draw, shape, box, COLORS[color])
        objects.append({"shape": shape, "color": color, "position": position,
                        "bbox": [round(v, 1) for v in box], "centroid": [round(cx, 1), round(cy, 1)],
                        "size": round(s, 1)})
    return img, {"width": w, "height": h, "background": list(bg), "objects": objects}


CORRUPT_KINDS: tuple[str, ...] = ("truncated_png", "zero_bytes", "not_an_image", "bad_caption_utf8",
                                  "empty_caption", "tiny_1x1")


def write_corrupt(out: Path, index: int, kind: str, rng: np.random.Generator) -> dict[str, Any]:
    """A deliberately broken input (same-stem pair) for the pipeline's reject path."""
    stem = f"corrupt_{index:04d}_{kind}"
    img, _ = make_image(rng)
    import io

    buf = io.BytesIO()
    img.save(buf, "PNG")
    caption: bytes = b"a broken sample"
    if kind == "truncated_png":
        data = buf.getvalue()[: len(buf.getvalue()) // 2]
    elif kind == "zero_bytes":
        data = b""
    elif kind == "not_an_image":
        data = b"this is text, not an image\n" * 10
    elif kind == "bad_caption_utf8":
        data, caption = buf.getvalue(), b"a red \xff\xfe circle"
    elif kind == "empty_caption":
        data, caption = buf.getvalue(), b"   \n"
    elif kind == "tiny_1x1":
        b2 = io.BytesIO()
        Image.new("RGB", (1, 1), (255, 0, 0)).save(b2, "PNG")
        data = b2.getvalue()
    else:
        raise ValueError(f"unknown corrupt kind {kind!r}; kinds: {CORRUPT_KINDS}")
    (out / f"{stem}.png").write_bytes(data)
    (out / f"{stem}.txt").write_bytes(caption)
    return {"file": f"{stem}.png", "kind": kind}


def class_names() -> list[str]:
    """The 75 (color, shape, position) classes of the class-conditional layout, ``red_circle_left`` ..."""
    return [f"{c}_{s}_{p}" for c in COLORS for s in SHAPES for p in POSITIONS]


def class_attrs(name: str) -> tuple[str, str, str]:
    color, shape, position = name.split("_")
    return color, shape, position


def generate_classes(out_dir: str | Path, per_class: int, seed: int = 0, size: int = 64,
                     progress: bool = True) -> dict[str, Any]:
    """Class-conditional layout (ImageNet train style): ``out/<color>_<shape>_<position>/<i>.png``,
    ``per_class`` square images per class; image ``i`` of a class depends only on (seed, class, i)."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if size < 24:
        raise ValueError(f"size must be >= 24 px, got {size}")
    out = Path(out_dir)
    names = class_names()
    for k, name in enumerate(tqdm(names, desc="shapes classes", unit="class", disable=not progress)):
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img, _ = make_image(np.random.default_rng([seed, k, i]), size, aspect=(1, 1), attrs=class_attrs(name))
            img.save(out / name / f"{i:05d}.png", "PNG", compress_level=1)
    return {"out": str(out), "images": per_class * len(names), "classes": len(names), "corrupt": 0}


def generate(out_dir: str | Path, cfg: ShapesConfig, progress: bool = True) -> dict[str, Any]:
    """Write ``cfg.n`` images + captions + ``labels.jsonl`` (+ ``corrupt.jsonl``) into ``out_dir``.

    Deterministic: image ``i`` depends only on ``(seed, i)``, so two runs give identical files.
    """
    if cfg.n < 0:
        raise ValueError(f"n must be >= 0, got {cfg.n}")
    if cfg.size < 24:
        raise ValueError(f"size must be >= 24 px (short side), got {cfg.size}")
    if cfg.image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {cfg.image_format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with open(out / "labels.jsonl", "w") as labels:
        for i in tqdm(range(cfg.n), desc="shapes", unit="img", disable=not progress):
            rng = np.random.default_rng([cfg.seed, i])
            img, lab = make_image(rng, cfg.size, cfg.two_objects)
            caption = caption_for(lab["objects"], int(rng.integers(len(TEMPLATES))))
            name = f"{i:06d}.{cfg.image_format}"
            if cfg.image_format == "png":
                img.save(out / name, "PNG", compress_level=1)
            else:
                img.save(out / name, "JPEG", quality=95)
            (out / f"{i:06d}.txt").write_text(caption + "\n", encoding="utf-8")
            labels.write(json.dumps({"file": name, "caption": caption, **lab}) + "\n")
            for o in lab["objects"]:
                counts[o["color"]] = counts.get(o["color"], 0) + 1
    corrupt = []
    if cfg.corrupt:
        rng = np.random.default_rng([cfg.seed, 10**9])
        corrupt = [write_corrupt(out, j, CORRUPT_KINDS[j % len(CORRUPT_KINDS)], rng)
                   for j in range(cfg.corrupt)]
        with open(out / "corrupt.jsonl", "w") as f:
            f.writelines(json.dumps(c) + "\n" for c in corrupt)
    return {"out": str(out), "images": cfg.n, "corrupt": len(corrupt), "colors": counts}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="sar-scale data synth",
        description="Write the synthetic 'shapes' dataset: an image folder with same-stem .txt captions "
                    "and labels.jsonl (shape, color, position per object) for evaluation.")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="random seed; image i depends only on (seed, i)")
    p.add_argument("--size", type=int, default=160, help="short side in pixels (default 160)")
    p.add_argument("--two-objects", action="store_true", help="two objects per image, two-part captions")
    p.add_argument("--format", choices=["png", "jpg"], default="png", help="image format (default png)")
    p.add_argument("--corrupt", type=int, default=0,
                   help=f"also write this many broken files (kinds cycle through {', '.join(CORRUPT_KINDS)})")
    p.add_argument("--classes", action="store_true",
                   help="class-conditional layout: OUT/<color>_<shape>_<position>/<i>.png (75 classes, square, "
                        "--n images per class), for `data prepare` with input.kind: imagefolder")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if a.classes:
            if a.two_objects or a.corrupt or a.format != "png":
                raise ValueError("--classes writes one object per image as png, without --corrupt")
            res = generate_classes(a.out, a.n, a.seed, a.size)
            print(f"wrote {res['images']} images in {res['classes']} class folders to {res['out']}")
            return 0
        res = generate(a.out, ShapesConfig(n=a.n, seed=a.seed, size=a.size, two_objects=a.two_objects,
                                           image_format=a.format, corrupt=a.corrupt))
    except ValueError as e:
        print(f"sar-scale data synth: {e}", file=sys.stderr)
        return 2
    print(f"wrote {res['images']} images (+{res['corrupt']} corrupt) to {res['out']}; "
          f"labels in {Path(res['out']) / 'labels.jsonl'}")
    return 0
