"""The shapes detector is exact on the generator's own images (the ceiling any model is scored against)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sar_scale.data.synthetic import ASPECTS, COLORS, POSITIONS, SHAPES, make_image
from sar_scale.eval.detector import detect, nearest_color, score, shape_from_fill


def _resize_short(img: Image.Image, short: int) -> Image.Image:
    w, h = img.size
    s = short / min(w, h)
    return img.resize((round(w * s), round(h * s)), Image.BICUBIC)


@pytest.mark.parametrize("short", [160, 128, 64])
def test_detector_exact_on_generator_images(short):
    """Every attribute of 240 generated images (all aspects, all combos seen) at training sizes."""
    seen = set()
    wrong = []
    for i in range(240):
        rng = np.random.default_rng([7, i])
        img, lab = make_image(rng, 160, aspect=ASPECTS[i % len(ASPECTS)])
        o = lab["objects"][0]
        seen.add((o["color"], o["shape"], o["position"]))
        if short != 160:
            img = _resize_short(img, short)
        det = detect(img)
        ok = score(det, o["color"], o["shape"], o["position"])
        if not ok["all"]:
            wrong.append((i, o, det))
    assert not wrong, wrong[:3]
    assert len({c for c, _, _ in seen}) == len(COLORS) and len({s for _, s, _ in seen}) == len(SHAPES)
    assert len({p for _, _, p in seen}) == len(POSITIONS)


def test_detector_robust_to_jpeg_and_noise():
    """Model samples are blurrier and noisier than the generator's; the thresholds leave margin."""
    wrong = 0
    for i in range(90):
        rng = np.random.default_rng([11, i])
        img, lab = make_image(rng, 160)
        img = _resize_short(img, 64)
        arr = np.asarray(img).astype(np.int16) + rng.normal(0, 8, size=(img.size[1], img.size[0], 3)).astype(np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=60)
        det = detect(Image.open(buf))
        o = lab["objects"][0]
        wrong += not score(det, o["color"], o["shape"], o["position"])["all"]
    assert wrong <= 1


def test_blank_and_wrong_inputs():
    blank = Image.new("RGB", (64, 64), (230, 230, 230))
    det = detect(blank)
    assert (det.color, det.shape, det.position) == (None, None, None)
    assert score(det, "red", "circle", "left") == {"color": False, "shape": False, "position": False, "all": False}
    with pytest.raises(ValueError, match="H x W x 3"):
        detect(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        detect(np.zeros((8, 8, 3), np.float32))


def test_corner_object_has_no_position_and_speckle_is_ignored():
    img = Image.new("RGB", (90, 90), (235, 235, 235))
    from PIL import ImageDraw

    d = ImageDraw.Draw(img)
    d.rectangle([5, 5, 30, 30], fill=COLORS["blue"])  # top-left corner: in no band
    d.point([(60, 60), (70, 40)], fill=(0, 0, 0))  # isolated noise pixels
    det = detect(img)
    assert det.color == "blue" and det.shape == "square" and det.position is None
    assert det.blobs == 1


def test_hue_and_fill_rules():
    assert nearest_color(359.0) == "red" and nearest_color(3.0) == "red"
    assert nearest_color(230.0) == "blue" and nearest_color(285.0) == "purple"
    assert shape_from_fill(0.52) == "triangle" and shape_from_fill(0.78) == "circle"
    assert shape_from_fill(0.97) == "square"
