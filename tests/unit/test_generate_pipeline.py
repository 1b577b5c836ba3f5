"""SARPipeline and the generate / edit CLIs on tiny random exports (text- and class-conditional).

Random weights make meaningless pictures; what is tested is the machinery: sizes, determinism,
the known tokens of an edit staying exactly, options and errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sar_scale.export import edit_cli, generate_cli
from sar_scale.export.pipeline import SARPipeline, derive_seed
from tests.export_parts import build_parts, export_tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen")
    parts = build_parts(root)
    export_tiny(parts, root / "text")
    export_tiny(parts, root / "class", cond="class")
    return {"text": root / "text", "class": root / "class"}


@pytest.fixture(scope="module")
def text_pipe(exports) -> SARPipeline:
    return SARPipeline.from_pretrained(exports["text"], device="cpu")


@pytest.fixture(scope="module")
def class_pipe(exports) -> SARPipeline:
    return SARPipeline.from_pretrained(exports["class"], device="cpu")


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((64, 64))


def _arrays(images) -> list[np.ndarray]:
    return [np.asarray(im) for im in images]


def test_top_level_import():
    import sar_scale

    assert sar_scale.SARPipeline is SARPipeline


def test_generate_size_seed_determinism(text_pipe):
    prompts = ["a red circle", "two blue squares", "a small green triangle"]
    images = text_pipe(prompts, height=64, width=96, steps=4, seed=7, batch_size=2)
    assert [im.size for im in images] == [(96, 64)] * 3 and all(im.mode == "RGB" for im in images)
    again = text_pipe(prompts, height=64, width=96, steps=4, seed=7, batch_size=2)
    assert all(np.array_equal(a, b) for a, b in zip(_arrays(images), _arrays(again)))
    t7 = text_pipe.generate_tokens(prompts, 64, 96, steps=4, seed=7, batch_size=2)
    t8 = text_pipe.generate_tokens(prompts, 64, 96, steps=4, seed=8, batch_size=2)
    assert t7.shape == (3, 8, 12)
    assert all(not torch.equal(t7[i], t8[i]) for i in range(3))  # every image changes with the seed
    assert not torch.equal(t7[0], t7[1])  # and images within a call differ
    # batch_size=1: image i depends only on (seed, i, its prompt), not on the requests after it
    single = text_pipe.generate_tokens(prompts, 64, 96, steps=4, seed=7, batch_size=1)
    assert torch.equal(single[:2], text_pipe.generate_tokens(prompts[:2], 64, 96, steps=4, seed=7, batch_size=1))
    assert derive_seed(7, 1) != derive_seed(7, 2) != derive_seed(8, 2)


def test_default_resolution_and_options(text_pipe):
    tokens = text_pipe.generate_tokens("a red circle", steps=2, seed=0, num_images_per_prompt=2, order="raster",
                                       intervals="equal", cfg_scale=2.0, cfg_schedule="linear", temperature=0.7,
                                       top_k=50, top_p=0.9)
    assert tokens.shape == (2, 8, 8)  # config.json default_resolution 64 px / downsample 8
    assert int(tokens.max()) < 1024 and int(tokens.min()) >= 0


def test_kv_cache_matches_recompute(text_pipe):
    kw = dict(height=64, width=64, steps=4, seed=3, temperature=0.0)
    with_cache = text_pipe.generate_tokens(["a red circle"], kv_cache=True, **kw)
    without = text_pipe.generate_tokens(["a red circle"], kv_cache=False, **kw)
    assert torch.equal(with_cache, without)


def test_class_conditional(class_pipe):
    images = class_pipe(class_ids=[0, 3, -1], height=64, width=64, steps=3, seed=0)
    assert len(images) == 3 and images[0].size == (64, 64)
    with pytest.raises(ValueError, match="class-conditional: pass class_ids"):
        class_pipe(["a red circle"], steps=2)
    with pytest.raises(ValueError, match=r"class_ids must be in \[-1, 9\]"):
        class_pipe(class_ids=[10], steps=2)


def test_bad_requests_are_named(text_pipe, class_pipe):
    with pytest.raises(ValueError, match="height=70 must be a positive multiple of the VQ downsample factor 8"):
        text_pipe("x", height=70, width=64)
    with pytest.raises(ValueError, match="top_p must be in"):
        text_pipe("x", top_p=0.0)
    with pytest.raises(ValueError, match="order must be one of"):
        text_pipe("x", order="diagonal")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        text_pipe("x", steps=0)
    with pytest.raises(ValueError, match="text-conditional: pass prompts"):
        text_pipe(class_ids=[1])
    with pytest.raises(TypeError, match="prompts must be strings"):
        text_pipe(["ok", 3])


def test_edit_keeps_known_tokens_exactly(text_pipe, photo):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 8, 64, 40))  # x 24..63 (partial patch at x=24 is fully white), y 8..39
    res = text_pipe.edit_tokens(photo, mask, "a red circle", steps=3, seed=1, num_images=2)
    known = res.known
    assert known.shape == (8, 8) and int((~known).sum()) == 5 * 4
    assert not known[1:5, 3:].any() and known[0].all() and known[:, :3].all()
    assert torch.equal(res.source_tokens, text_pipe.encode_image(photo))
    for b in range(2):
        assert torch.equal(res.tokens[b][known], res.source_tokens[known])
        assert not torch.equal(res.tokens[b][~known], res.source_tokens[~known])
    assert not torch.equal(res.tokens[0], res.tokens[1])
    # a single white pixel inside a patch makes that whole patch unknown
    mask2 = Image.new("L", (64, 64), 0)
    mask2.putpixel((13, 50), 255)
    k2 = text_pipe.known_mask(mask2, (64, 64))
    assert int((~k2).sum()) == 1 and not k2[50 // 8, 13 // 8]
    out = text_pipe.edit(photo, mask, "a red circle", steps=2, seed=0)
    assert len(out) == 1 and out[0].size == (64, 64)


def test_outpaint_and_class_edit(class_pipe, photo):
    canvas, mask = SARPipeline.outpaint_canvas(photo, left=16, top=0, right=0, bottom=8)
    assert canvas.size == (80, 72) and mask.getpixel((0, 0)) == 255 and mask.getpixel((40, 30)) == 0
    res = class_pipe.edit_tokens(canvas, mask, class_id=2, steps=3, seed=0)
    assert res.tokens.shape == (1, 9, 10)
    assert not res.known[:, :2].any() and not res.known[8].any() and res.known[:8, 2:].all()
    assert torch.equal(res.tokens[0][res.known], res.source_tokens[res.known])
    res_uncond = class_pipe.edit_tokens(canvas, mask, steps=3, seed=0)  # no class id: unconditional
    assert torch.equal(res_uncond.tokens[0][res.known], res.source_tokens[res.known])


def test_edit_bad_inputs(text_pipe, photo, tmp_path):
    with pytest.raises(ValueError, match="mask is 32x32 but the image is 64x64"):
        text_pipe.edit(photo, Image.new("L", (32, 32), 255), "x")
    with pytest.raises(ValueError, match="nothing to regenerate"):
        text_pipe.edit(photo, Image.new("L", (64, 64), 0), "x")
    with pytest.raises(ValueError, match="width=60 must be a positive multiple"):
        text_pipe.edit(photo.resize((60, 64)), Image.new("L", (60, 64), 255), "x")
    with pytest.raises(FileNotFoundError, match="image not found"):
        text_pipe.edit(tmp_path / "missing.png", Image.new("L", (64, 64), 255), "x")


# ----------------------------------------------------------------------------- CLIs


def test_generate_cli(exports, tmp_path, capsys):
    pf = tmp_path / "prompts.txt"
    pf.write_text("a red circle\n\nthree yellow squares\n")
    out = tmp_path / "samples"
    rc = generate_cli.main(["--model", str(exports["text"]), "--prompt", "a blue triangle", "--prompts-file", str(pf),
                            "--num-images", "2", "--batch-size", "4", "--steps", "3", "--height", "64", "--width",
                            "80", "--seed", "5", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert pngs == [f"{i:04d}.png" for i in range(6)]
    assert all(Image.open(out / p).size == (80, 64) for p in pngs)
    assert Image.open(out / "grid.png").size == (3 * 80 + 2 * 2, 2 * 64 + 2)
    meta = json.loads((out / "generation.json").read_text())
    assert [r["prompt"] for r in meta["images"]] == ["a blue triangle"] * 2 + ["a red circle"] * 2 + \
        ["three yellow squares"] * 2
    assert meta["settings"]["resolved"]["steps"] == 3 and meta["settings"]["seed"] == 5
    assert "wrote 6 images (80x64 px" in capsys.readouterr().out


def test_generate_cli_class_and_errors(exports, tmp_path, capsys):
    out = tmp_path / "c"
    assert generate_cli.main(["--model", str(exports["class"]), "--class-id", "4", "--steps", "2", "--out",
                              str(out), "--no-kv-cache", "--device", "cpu"]) == 0
    assert Image.open(out / "0000.png").size == (64, 64)
    assert json.loads((out / "generation.json").read_text())["images"][0]["class_id"] == 4
    assert generate_cli.main(["--model", str(exports["class"]), "--out", str(out)]) == 2
    assert "--class-id" in capsys.readouterr().err
    assert generate_cli.main(["--model", str(exports["text"]), "--prompt", "x", "--height", "65",
                              "--out", str(out), "--device", "cpu"]) == 2
    assert "height=65" in capsys.readouterr().err
    assert generate_cli.main(["--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(out)]) == 2
    assert "config.json: missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        generate_cli.main(["--help"])
    assert e.value.code == 0 and "--prompts-file" in capsys.readouterr().out


def test_edit_cli(exports, photo, tmp_path, capsys):
    photo.save(tmp_path / "in.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))
    mask.save(tmp_path / "mask.png")
    rc = edit_cli.main(["--model", str(exports["text"]), "--image", str(tmp_path / "in.png"), "--mask",
                        str(tmp_path / "mask.png"), "--prompt", "a red circle", "--steps", "2", "--out",
                        str(tmp_path / "out.png"), "--device", "cpu"])
    assert rc == 0 and Image.open(tmp_path / "out.png").size == (64, 64)
    assert "kept 32/64 tokens exactly" in capsys.readouterr().out
    rc = edit_cli.main(["--model", str(exports["text"]), "--image", str(tmp_path / "in.png"), "--outpaint",
                        "0,0,32,0", "--prompt", "x", "--num-images", "2", "--steps", "2", "--out",
                        str(tmp_path / "wide.png"), "--device", "cpu"])
    assert rc == 0
    assert [Image.open(tmp_path / f"wide_{i}.png").size for i in range(2)] == [(96, 64)] * 2
    assert (tmp_path / "wide_grid.png").is_file()
    assert edit_cli.main(["--model", str(exports["text"]), "--image", str(tmp_path / "in.png"),
                          "--out", str(tmp_path / "x.png")]) == 2
    assert "exactly one of --mask or --outpaint" in capsys.readouterr().err
    rc = edit_cli.main(["--model", str(exports["text"]), "--image", str(tmp_path / "in.png"), "--mask",
                        str(tmp_path / "mask.png"), "--resize", "48x40", "--steps", "2", "--out",
                        str(tmp_path / "r.png"), "--device", "cpu"])
    assert rc == 0 and Image.open(tmp_path / "r.png").size == (48, 40)


def test_text_features_length_matches_training(exports, tmp_path):
    """Shards with precomputed features were encoded at `data prepare`'s length and cut to max_text_len
    by the loader; the export records that length and the pipeline cuts the same way."""
    from sar_scale.export.checkpoints import CheckpointSource
    from sar_scale.export.release import _text_max_length
    from sar_scale.models import get_config

    fmt = get_config("debug", cond="text", max_text_len=16)
    src = CheckpointSource(tmp_path, "zero", {"config": {"data": {"cond": "auto"}}}, None, "x", True)
    assert _text_max_length(src, {"text_features": True, "text_max_length": 120}, fmt) == 120
    assert _text_max_length(src, {"text_features": False, "text_max_length": 120}, fmt) == 16
    src.train_state["config"]["data"]["cond"] = "text_encoder"
    assert _text_max_length(src, {"text_features": True, "text_max_length": 120}, fmt) == 16
    parts = build_parts(tmp_path / "parts")
    export_tiny(parts, tmp_path / "e", text_max_length=40)
    pipe = SARPipeline.from_pretrained(tmp_path / "e", device="cpu")
    assert pipe.config.text_encoder.max_length == 40 and pipe.text_encoder.max_length == 40
    long = " ".join(["a red circle on the left and"] * 6)
    cond = pipe._condition([long, "a dot"])
    assert cond.text.shape[1] == 16 and bool(cond.text_mask[0].all()) and not bool(cond.text_mask[1].all())
    assert pipe(long, steps=2)[0].size == (64, 64)
