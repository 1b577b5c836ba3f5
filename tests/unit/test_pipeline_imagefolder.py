"""`input.kind: imagefolder` (ImageNet train layout) without Ray: class ids, captions, flip copies, rejects."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipelines.config import PrepareConfig
from pipelines.inputs import class_index, iter_units
from pipelines.stages import scan_record
from tests.data_inputs import photo


def _tree(root):
    for cls, n in (("tabby_cat", 2), ("goldfish", 1), ("zebra", 2)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            photo(80, 72, hash((cls, i)) % 1000).save(root / cls / f"{cls}_{i}.png")
    (root / "stray.png").write_bytes((root / "zebra" / "zebra_0.png").read_bytes())  # not in a class folder
    (root / "zebra" / "notes.pdf").write_bytes(b"%PDF")  # not an image
    (root / "zebra" / "labels.txt").write_text("side files are not samples")
    return root


def _cfg(root, **inp) -> PrepareConfig:
    return PrepareConfig.model_validate({"input": {"kind": "imagefolder", "path": str(root), **inp},
                                         "filters": {"min_side": 32}})


def _records(cfg):
    units = list(iter_units(cfg.input))  # streamed units carry their records and enumeration rejects
    return [r for u in units for r in u["records"]], [r for u in units for r in u["rejects"]]


def test_ids_from_sorted_class_names_captions_and_rejects(tmp_path):
    root = _tree(tmp_path / "in")
    cfg = _cfg(root)
    assert class_index(cfg.input) == {"goldfish": 0, "tabby_cat": 1, "zebra": 2}
    recs, rejects = _records(cfg)
    assert [r["source_id"] for r in recs] == ["goldfish/goldfish_0.png", "tabby_cat/tabby_cat_0.png",
                                              "tabby_cat/tabby_cat_1.png", "zebra/zebra_0.png", "zebra/zebra_1.png"]
    z = recs[-1]
    assert z["caption"] == "zebra" and z["extra"] == {"class_id": 2, "class_name": "zebra"}
    assert {(r["source_id"], r["reason"]) for r in rejects} == {("stray.png", "class_missing"),
                                                               ("zebra/notes.pdf", "unsupported_format")}


def test_mapping_file_json_and_text(tmp_path):
    root = _tree(tmp_path / "in")
    (tmp_path / "map.json").write_text(json.dumps({"zebra": 340, "goldfish": 1}))
    recs, rejects = _records(_cfg(root, class_map=str(tmp_path / "map.json")))
    assert {r["extra"]["class_name"]: r["extra"]["class_id"] for r in recs} == {"zebra": 340, "goldfish": 1}
    assert sorted(r["source_id"] for r in rejects if r["reason"] == "unknown_class") == [
        "tabby_cat/tabby_cat_0.png", "tabby_cat/tabby_cat_1.png"]
    (tmp_path / "map.txt").write_text("zebra\ntabby_cat\ngoldfish\n")
    assert class_index(_cfg(root, class_map=str(tmp_path / "map.txt")).input) == {"zebra": 0, "tabby_cat": 1,
                                                                                   "goldfish": 2}
    (tmp_path / "dup.json").write_text(json.dumps({"a": 1, "b": 1}))
    with pytest.raises(ValueError, match="share an id"):
        class_index(_cfg(root, class_map=str(tmp_path / "dup.json")).input)
    with pytest.raises(ValueError, match="not found"):
        class_index(_cfg(root, class_map=str(tmp_path / "nope.json")).input)
    with pytest.raises(ValueError, match="no class folders"):
        (tmp_path / "empty").mkdir()
        class_index(_cfg(tmp_path / "empty").input)
    with pytest.raises(ValueError, match="imagefolder only"):
        PrepareConfig.model_validate({"input": {"kind": "folder", "path": str(root), "flip": True}})


def test_flip_copies_are_mirrored_extra_samples(tmp_path):
    root = _tree(tmp_path / "in")
    cfg = _cfg(root, flip=True)
    recs, _ = _records(cfg)
    assert len(recs) == 10
    flip = next(r for r in recs if r["source_id"] == "zebra/zebra_1.png#flip")
    orig = next(r for r in recs if r["source_id"] == "zebra/zebra_1.png")
    assert flip["extra"] == {"class_id": 2, "class_name": "zebra", "flip": True} and flip["caption"] == "zebra"
    a, b = scan_record(orig, cfg), scan_record(flip, cfg)
    assert a["pixhash"] != b["pixhash"] and (a["w"], a["h"]) == (b["w"], b["h"])
    from pipelines.stages import _flipped

    img = Image.open(root / "zebra" / "zebra_1.png").convert("RGB")
    assert np.array_equal(np.asarray(_flipped(img, flip["img"]))[:, ::-1], np.asarray(img))
