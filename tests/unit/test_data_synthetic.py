"""The shapes generator: pixels agree with labels (color hue, centroid band, bbox fill), determinism, CLI."""

from __future__ import annotations

import colorsys
import json

import numpy as np
from PIL import Image

from sar_scale.data import synthetic as syn
from sar_scale.data.synthetic import COLOR_HUES, SHAPE_FILL, ShapesConfig, generate, position_of


def _detect(img: Image.Image, bg: list[int]) -> dict:
    a = np.asarray(img.convert("RGB")).astype(int)
    fg = np.abs(a - np.array(bg)).sum(-1) > 60
    ys, xs = np.nonzero(fg)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    fill = fg.sum() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    r, g, b = a[fg].mean(0) / 255
    hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360
    color = min(COLOR_HUES, key=lambda c: min(abs(COLOR_HUES[c] - hue), 360 - abs(COLOR_HUES[c] - hue)))
    shape = min(SHAPE_FILL, key=lambda s: abs(SHAPE_FILL[s] - fill))
    return {"color": color, "shape": shape, "position": position_of(cx, cy, img.width, img.height)}


def test_pixels_match_labels_and_deterministic(tmp_path):
    res = generate(tmp_path / "a", ShapesConfig(n=60, seed=3), progress=False)
    assert res["images"] == 60
    labels = [json.loads(line) for line in (tmp_path / "a" / "labels.jsonl").read_text().splitlines()]
    aspects = set()
    for lab in labels:
        img = Image.open(tmp_path / "a" / lab["file"])
        assert img.size == (lab["width"], lab["height"])
        aspects.add(round(lab["width"] / lab["height"], 2))
        (obj,) = lab["objects"]
        assert _detect(img, lab["background"]) == {k: obj[k] for k in ("color", "shape", "position")}
        s = obj["size"] / min(img.size)
        assert 0.25 < s < 0.4  # about a third of the short side
        cap = (tmp_path / "a" / lab["file"]).with_suffix(".txt").read_text().strip()
        assert cap == lab["caption"] and obj["color"] in cap and obj["shape"] in cap
    assert aspects == {1.0, 0.6, 1.67}
    generate(tmp_path / "b", ShapesConfig(n=60, seed=3), progress=False)
    for lab in labels[:10]:
        assert (tmp_path / "a" / lab["file"]).read_bytes() == (tmp_path / "b" / lab["file"]).read_bytes()
    generate(tmp_path / "c", ShapesConfig(n=5, seed=4), progress=False)
    assert (tmp_path / "c" / "000000.png").read_bytes() != (tmp_path / "a" / "000000.png").read_bytes()


def test_hues_are_separated():
    hues = sorted(COLOR_HUES.values())
    gaps = [b - a for a, b in zip(hues, hues[1:])] + [360 - hues[-1] + hues[0]]
    assert min(gaps) >= 45


def test_two_objects_do_not_overlap(tmp_path):
    generate(tmp_path, ShapesConfig(n=30, seed=1, two_objects=True), progress=False)
    for line in (tmp_path / "labels.jsonl").read_text().splitlines():
        lab = json.loads(line)
        a, b = (o["bbox"] for o in lab["objects"])
        assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]
        assert lab["objects"][0]["position"] != lab["objects"][1]["position"]
        assert " and " in lab["caption"]
        for o in lab["objects"]:
            assert position_of(*o["centroid"], lab["width"], lab["height"]) == o["position"]


def test_cli_with_corrupt_files(tmp_path):
    out = tmp_path / "d"
    assert syn.main(["--out", str(out), "--n", "4", "--seed", "0", "--corrupt", "6", "--format", "jpg"]) == 0
    kinds = [json.loads(line)["kind"] for line in (out / "corrupt.jsonl").read_text().splitlines()]
    assert sorted(kinds) == sorted(syn.CORRUPT_KINDS)
    assert (out / "corrupt_0001_zero_bytes.png").stat().st_size == 0
    assert len(list(out.glob("0*.jpg"))) == 4
    assert syn.main(["--out", str(out), "--n", "-1"]) == 2


def test_class_folders_for_imagefolder_ingest(tmp_path):
    """`data synth --classes`: 75 (color, shape, position) class folders whose images the detector reads back."""
    from sar_scale.eval.detector import detect, score

    assert len(syn.class_names()) == 75 and len(set(syn.class_names())) == 75
    assert syn.main(["--classes", "--out", str(tmp_path / "c"), "--n", "2", "--size", "64"]) == 0
    folders = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert folders == sorted(syn.class_names())
    for name in ("red_circle_left", "blue_triangle_top", "purple_square_center"):
        files = sorted((tmp_path / "c" / name).glob("*.png"))
        assert len(files) == 2
        for f in files:
            im = Image.open(f)
            assert im.size == (64, 64)
            assert score(detect(im), *syn.class_attrs(name))["all"], (name, f)
    again = tmp_path / "again"
    syn.generate_classes(again, 2, size=64, progress=False)
    assert (again / "red_circle_left" / "00001.png").read_bytes() == (tmp_path / "c/red_circle_left/00001.png").read_bytes()
    assert syn.main(["--classes", "--two-objects", "--out", str(tmp_path / "x")]) == 2
