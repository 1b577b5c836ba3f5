"""The small trainable VQ: data loading with rejects, `tokenizer train|eval` CLI, and quality on
synthetic shapes (colours must survive a round trip well enough for a hue classifier)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sar_scale.tokenizers import cli
from sar_scale.tokenizers.train import (
    VQTrainConfig,
    load_images,
    split_holdout,
    to_model_range,
    to_uint8,
    train_vq,
)
from sar_scale.tokenizers.vq import load_vq

PALETTE = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
           "yellow": (235, 200, 20), "purple": (140, 40, 180)}


def make_shapes(out: Path, n: int, size: int = 32, seed: int = 0) -> list[tuple[Path, str]]:
    """Light solid background with one coloured circle/square/triangle (loader tests only)."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(n):
        bg = tuple(rng.randint(215, 250) for _ in range(3))
        img = Image.new("RGB", (size, size), bg)
        d = ImageDraw.Draw(img)
        color, shape = rng.choice(list(PALETTE)), rng.choice(["circle", "square", "triangle"])
        r = rng.randint(size // 5, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            d.ellipse(box, fill=PALETTE[color])
        elif shape == "square":
            d.rectangle(box, fill=PALETTE[color])
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=PALETTE[color])
        path = out / "sub" / f"{i:04d}_{color}_{shape}.png" if i % 2 else out / f"{i:04d}_{color}_{shape}.png"
        path.parent.mkdir(exist_ok=True)
        img.save(path)
        made.append((path, color))
    return made


def test_load_images_folder_tar_and_rejects(tmp_path):
    make_shapes(tmp_path / "imgs", 6, size=40)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "imgs" / "notes.txt").write_text("ignored")
    data = load_images(tmp_path / "imgs", 32, progress=False)
    assert data.images_N3SS.shape == (6, 3, 32, 32) and data.images_N3SS.dtype == torch.uint8
    assert list(data.rejects) == ["broken.png"] and data.rejects["broken.png"].startswith("undecodable")
    assert any(n.startswith("sub/") for n in data.names)  # recursive

    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "shard-000000.tar")) as w:
        for i, p in enumerate(sorted((tmp_path / "imgs").glob("*.png"))[:3]):
            w.write({"__key__": f"k{i}", "jpg": p.read_bytes() if i else b"garbage", "txt": "x"})
        w.write({"__key__": "nojpg", "txt": "caption only"})
    tar = load_images(tmp_path / "shard-000000.tar", 16, progress=False)
    assert tar.images_N3SS.shape[0] == 2 and len(tar.rejects) == 2

    with pytest.raises(ValueError, match="no usable images in"):
        load_images(tmp_path / "shard-000000.tar", 16, max_images=1, progress=False)
    with pytest.raises(FileNotFoundError, match="data source not found"):
        load_images(tmp_path / "missing", 16)


def test_non_square_images_are_centre_cropped(tmp_path):
    img = np.zeros((20, 60, 3), np.uint8)
    img[:, 20:40] = 255  # white centre third
    Image.fromarray(img).save(tmp_path / "wide.png")
    out = load_images(tmp_path, 16, progress=False).images_N3SS[0]
    assert out.float().mean() > 200  # only the centre survives the crop


def test_split_and_ranges():
    a = split_holdout(50, 0.1, seed=3)
    assert a == split_holdout(50, 0.1, seed=3) and len(a[1]) == 5 and not set(a[0]) & set(a[1])
    assert split_holdout(2, 0.01, 0) [1] and split_holdout(1, 0.5, 0) == ([0], [])
    x = torch.tensor([0, 128, 255], dtype=torch.uint8)
    assert torch.equal(to_uint8(to_model_range(x)), x)


def test_train_config_errors_name_the_field(tmp_path):
    from sar_scale.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="image_size"):
        load_config(VQTrainConfig, {"data": "d", "out": "o", "image_size": 36})  # not divisible by 8
    with pytest.raises(ConfigError, match="holdout"):
        load_config(VQTrainConfig, {"data": "d", "out": "o", "holdout": 1.5})
    with pytest.raises(ConfigError, match="stepz"):
        load_config(VQTrainConfig, {"data": "d", "out": "o", "stepz": 3})
    assert cli.main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                     "--image-size", "30"]) == 2


# demo-small's code path at test scale: half width and downsample 4, so 32 px images still get
# an 8x8 grid (at 4x4 nearly every token is a shape edge and colours need far more steps).
TEST_VQ = ["--set", "vq.ch=16", "--set", "vq.ch_mult=[1,1,2]", "--set", "vq.norm_groups=4",
           "--set", "vq.z_channels=32", "--set", "vq.codebook_size=256", "--set", "threads=1",
           "--set", "warmup_steps=20"]


@pytest.mark.slow
def test_cli_train_then_eval_on_demo_shapes(tmp_path, capsys):
    """Short CPU run on the demo's own shapes generator: the CLI trains, saves, reloads and
    evaluates; the reconstruction beats a flat image. Colour fidelity (the demo's hue detector on
    reconstructions) needs more steps than a unit test can afford: it is printed here and
    measured at demo scale by benchmarks/bench_vq_quality.py."""
    from sar_scale.data.synthetic import make_image
    from sar_scale.eval.detector import detect

    rng = np.random.default_rng(0)
    (tmp_path / "shapes").mkdir()
    for i in range(120):
        img, lab = make_image(rng, size=32, aspect=(1, 1))
        img.save(tmp_path / "shapes" / f"{i:04d}_{lab['objects'][0]['color']}.png")
    out = tmp_path / "vq"
    threads = torch.get_num_threads()
    try:
        rc = cli.main(["train", "--data", str(tmp_path / "shapes"), "--out", str(out), "--image-size", "32",
                       "--steps", "500", "--batch-size", "16", "--holdout", "0.2", "--quiet", *TEST_VQ])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    printed = capsys.readouterr().out
    assert "held-out (24 images): MSE" in printed and "codebook usage" in printed
    assert {"config.json", "model.safetensors", "train_summary.json", "train_config.json",
            "heldout_reconstructions.png"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["history"][-1]["loss"] < summary["history"][0]["loss"]

    vq = load_vq(out)  # the same loader as a LlamaGen checkpoint
    assert vq.config.name == "demo-small" and vq.downsample == 4
    data = load_images(tmp_path / "shapes", 32, progress=False)
    _, hold = split_holdout(len(data.names), 0.2, seed=0)
    x_u8 = data.images_N3SS[hold]
    rec_u8 = to_uint8(vq.decode(vq.encode(to_model_range(x_u8))))
    truth = [data.names[i].split("_")[1].removesuffix(".png") for i in hold]
    assert [detect(x.permute(1, 2, 0).numpy()).color for x in x_u8] == truth  # the detector itself
    pred = [detect(r.permute(1, 2, 0).numpy()).color for r in rec_u8]
    accuracy = np.mean([p == t for p, t in zip(pred, truth)])
    err = (rec_u8.float() - x_u8.float()).pow(2).mean()
    flat = (x_u8.float().mean((2, 3), keepdim=True) - x_u8.float()).pow(2).mean()
    assert err < 0.5 * flat, (err, flat)

    rc = cli.main(["eval", "--vq", str(out), "--data", str(tmp_path / "shapes"), "--image-size", "32",
                   "--max-images", "20", "--quiet"])
    metrics = json.loads(capsys.readouterr().out)
    assert rc == 0 and metrics["images"] == 20 and metrics["psnr"] > 15
    print(f"hue accuracy after a 500-step test-scale VQ round trip: {accuracy:.2f}")
    assert 0 < metrics["codebook_usage"] <= 1 and metrics["codes_used"] >= 2


def test_train_vq_rejects_unreadable_and_records_them(tmp_path):
    make_shapes(tmp_path / "d", 4, size=16)
    (tmp_path / "d" / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    cfg = VQTrainConfig(data=str(tmp_path / "d"), out=str(tmp_path / "o"), image_size=16, steps=2,
                        batch_size=2, vq={"codebook_size": 16})
    summary = train_vq(cfg, progress=False)
    assert summary["rejects"] == 1 and summary["train_images"] == 3
    saved = json.loads((tmp_path / "o" / "train_summary.json").read_text())
    assert "bad.jpg" in saved["rejected"]
    assert load_vq(tmp_path / "o").config.codebook_size == 16


def test_help_explains(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--steps" in text and "commitment" in text and "GAN/LPIPS" in text



def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels: PIL refuses it as a decompression bomb."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def test_hostile_images_are_skipped_with_one_line_reasons(tmp_path, caplog):
    """`tokenizer train --data DIR` on a folder with a decompression bomb and a truncated file: skip and
    count them as `data prepare` does, fail clearly only if nothing usable is left."""
    import logging

    make_shapes(tmp_path / "d", 3, size=24)
    good = sorted((tmp_path / "d").rglob("*.png"))[0].read_bytes()
    (tmp_path / "d" / "bomb.png").write_bytes(_png_claiming(20000, 20000))
    (tmp_path / "d" / "trunc.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "d" / "empty.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        data = load_images(tmp_path / "d", 16, progress=False)
    assert data.images_N3SS.shape[0] == 3
    assert data.rejects["bomb.png"].startswith("decompression_bomb")
    assert data.rejects["trunc.png"].startswith(("truncated", "undecodable"))
    assert data.rejects["empty.jpg"] == "empty_file"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert len(lines) == 4 and all("\n" not in m for m in lines) and "skipped 3 of 6 images" in lines[-1]
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "bomb.png").write_bytes(_png_claiming(20000, 20000))
    with pytest.raises(ValueError, match="no usable images in .*1 rejected"):
        load_images(hostile, 16, progress=False)
