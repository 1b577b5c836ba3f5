"""Decode/caption validation, each bad kind -> its reason; conversions to RGB; near-dup index; tar scan safety."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipelines.config import FilterConfig, PrepareConfig
from pipelines.inputs import scan_tar
from pipelines.validate import check_image, clean_caption, perceptual_hash, pixel_hash
from sar_scale.data.decode import DecodeConfig, Reject, decode_image
from tests.data_inputs import photo, special_inputs

DEC = DecodeConfig(max_pixels=16_000_000)
FIL = FilterConfig(min_side=32, caption_max_chars=300, caption_min_words=2)


def _validate(data: bytes, cap: bytes | None) -> Image.Image:
    clean_caption(cap, FIL)
    img = decode_image(data, DEC)
    check_image(img, FIL)
    return img


@pytest.mark.parametrize("name", sorted(special_inputs()))
def test_every_special_input(name):
    fname, data, cap, reason = special_inputs()[name]
    if reason is None or reason == "duplicate":
        img = _validate(data, cap)
        assert img.mode == "RGB"
    else:
        with pytest.raises(Reject) as ei:
            _validate(data, cap)
        assert ei.value.reason == reason, ei.value


def test_conversions_are_faithful():
    sp = special_inputs()
    img = decode_image(sp["exif_rotated"][1], DEC)
    assert img.size == (112, 64)  # EXIF orientation applied
    g16 = np.asarray(decode_image(sp["png16"][1], DEC))
    assert g16.shape == (64, 80, 3) and g16[0, 0, 0] == 0 and g16[-1, -1, 0] == 255  # scaled, not clipped
    assert 100 < g16[32, 40, 0] < 160
    pa = decode_image(sp["palette_alpha"][1], DEC)
    assert pa.mode == "RGB"
    # transparent palette entry 0 composited on white
    raw = Image.open(io.BytesIO(sp["palette_alpha"][1]))
    idx = np.asarray(raw)
    if (idx == 0).any():
        y, x = np.argwhere(idx == 0)[0]
        assert pa.getpixel((int(x), int(y))) == (255, 255, 255)
    la = Image.new("LA", (40, 40), (0, 0))
    b = io.BytesIO()
    la.save(b, "PNG")
    assert decode_image(b.getvalue(), DEC).getpixel((0, 0)) == (255, 255, 255)


def test_caption_cleaning():
    assert clean_caption("a red\x00 circle\x07\t on\u200b the  left\r\n".encode(), FIL) == "a red circle on the left"
    assert clean_caption("\ufeffcaf\u0065\u0301 au lait", FIL) == "caf\u00e9 au lait"  # BOM gone, NFC
    with pytest.raises(Reject, match="caption_too_short"):
        clean_caption(b"one", FIL)
    with pytest.raises(Reject, match="caption_too_long"):
        clean_caption("x " * 200, FIL)
    with pytest.raises(Reject, match="caption_missing"):
        clean_caption(None, FIL)


def test_filters_and_hashes():
    with pytest.raises(Reject, match="aspect_ratio"):
        check_image(Image.new("RGB", (500, 100)), FIL)
    a = photo(128, 128, 1)
    b = a.copy()
    assert pixel_hash(a) == pixel_hash(b)
    assert pixel_hash(a) != pixel_hash(photo(128, 128, 2))
    # real photos (shipped inside scikit-image): a resized, re-encoded copy is a near duplicate,
    # other photos are not
    skdata = pytest.importorskip("skimage.data")
    astro = Image.fromarray(skdata.astronaut())
    buf = io.BytesIO()
    astro.resize((300, 300)).save(buf, "JPEG", quality=60)
    copy = Image.open(buf).convert("RGB")
    h = perceptual_hash(astro)
    assert (h ^ perceptual_hash(copy)).bit_count() <= 4  # the pipeline's default phash_max_distance
    for name in ("chelsea", "coffee", "rocket"):
        assert (h ^ perceptual_hash(Image.fromarray(getattr(skdata, name)()).convert("RGB"))).bit_count() > 4


def _tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for ti, data in members:
            ti.size = len(data) if ti.isfile() else 0
            tf.addfile(ti, io.BytesIO(data) if ti.isfile() else None)
    return buf.getvalue()


def test_scan_tar_rejects_unsafe_members_without_extracting(tmp_path, monkeypatch):
    b = io.BytesIO()
    photo(64, 64).save(b, "PNG")
    png = b.getvalue()
    link = tarfile.TarInfo("s2.png")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    members = [(tarfile.TarInfo("s1.png"), png), (tarfile.TarInfo("s1.txt"), b"a good one"),
               (tarfile.TarInfo("../evil.txt"), b"x"), (tarfile.TarInfo("/abs/x.png"), png),
               (link, b""), (tarfile.TarInfo("d/s3.png"), png), (tarfile.TarInfo("d/s3.txt"), b"nested key")]
    (tmp_path / "in.tar").write_bytes(_tar_bytes(members))
    monkeypatch.chdir(tmp_path)
    events = list(scan_tar(str(tmp_path), "in.tar"))
    recs = {e[1]["source_id"]: e[1] for e in events if e[0] == "record"}
    rej = {e[1]["source_id"]: e[1]["reason"] for e in events if e[0] == "reject"}
    assert set(recs) == {"in.tar/s1", "in.tar/d/s3"}
    assert rej == {"in.tar/../evil.txt": "unsafe_member", "in.tar//abs/x.png": "unsafe_member",
                   "in.tar/s2.png": "unsafe_member"}
    assert not (tmp_path.parent / "evil.txt").exists() and not (tmp_path / "abs").exists()
    off, size = recs["in.tar/s1"]["img"]["range"]
    assert (tmp_path / "in.tar").read_bytes()[off: off + size] == png
    # a truncated tar: samples before the damage survive, the tar itself is recorded
    full = _tar_bytes(members[:2] + members[5:])
    (tmp_path / "cut.tar").write_bytes(full[: 5 * 512 + 100])  # inside d/s3.png's data
    ev = [(k, v["source_id"], v.get("reason")) for k, v in scan_tar(str(tmp_path), "cut.tar")]
    assert ev == [("record", "cut.tar/s1", None), ("reject", "cut.tar/d/s3", "truncated"),
                  ("reject", "cut.tar", "corrupt_tar")]
    (tmp_path / "cut2.tar").write_bytes(full[: 4 * 512 + 100])  # inside d/s3.png's header
    ev = [(k, v["source_id"], v.get("reason")) for k, v in scan_tar(str(tmp_path), "cut2.tar")]
    assert ev == [("record", "cut2.tar/s1", None), ("reject", "cut2.tar", "corrupt_tar")]


def test_config_errors_name_the_field():
    from sar_scale.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="tokenize.resolutions"):
        load_config(PrepareConfig, {"input": {"path": "x"}, "tokenize": {"resolutions": [64, 96]}})
    with pytest.raises(ConfigError, match="unknown key 'filters.min_sid'"):
        load_config(PrepareConfig, {"input": {"path": "x"}, "filters": {"min_sid": 3}})
    with pytest.raises(ConfigError, match="input.path"):
        load_config(PrepareConfig, {})
