"""Builders of good and deliberately bad image-text inputs for the data pipeline tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from sar_scale.data.synthetic import ShapesConfig, generate


def _png(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG", **kw)
    return b.getvalue()


def _jpg(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", quality=90, **kw)
    return b.getvalue()


def photo(w: int = 96, h: int = 64, seed: int = 0) -> Image.Image:
    """A smooth random RGB image (distinct per seed)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([np.sin(xx / (5 + 10 * rng.random()) + rng.random() * 6) * 100 + 128,
                  np.cos(yy / (5 + 10 * rng.random())) * 100 + 128,
                  (xx + yy) % 255], -1)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8), "RGB")


# name -> (image file name, image bytes, caption bytes | None, expected reject reason | None)
def special_inputs() -> dict[str, tuple[str, bytes, bytes | None, str | None]]:
    base = photo(96, 64, 1)
    good_png = _png(base)
    good_jpg = _jpg(photo(80, 80, 2))
    cmyk = _jpg(photo(72, 72, 3).convert("CMYK"))
    a16 = (np.linspace(0, 65535, 80 * 64).reshape(64, 80)).astype(np.uint16)
    png16 = _png(Image.fromarray(a16))  # uint16 -> mode I;16
    pal = photo(70, 70, 4).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    pal.info["transparency"] = 0
    pal_alpha = _png(pal, transparency=0)
    exif_img = photo(64, 112, 5)  # stored 64 wide x 112 tall, EXIF says rotate 90 -> 112x64
    exif = Image.Exif()
    exif[0x0112] = 6
    exif_jpg = _jpg(exif_img, exif=exif.tobytes())
    frames = [photo(64, 64, 6 + i) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    bomb = _png(Image.new("1", (9000, 9000)))  # 81 Mpx in a tiny file
    return {
        "cmyk": ("cmyk.jpg", cmyk, b"a cmyk photo of waves", None),
        "png16": ("gray16.png", png16, b"a sixteen bit gray ramp", None),
        "palette_alpha": ("palette.png", pal_alpha, b"a palette image with alpha", None),
        "exif_rotated": ("rotated.jpg", exif_jpg, b"a rotated photo of waves", None),
        "control_chars": ("ctrl.png", _png(photo(64, 96, 7)), "a red\x00 circle\x07\t on\u200b the  left\r\n".encode(),
                          None),
        "png_named_jpg": ("misnamed.jpg", _png(photo(90, 70, 8)), b"png bytes in a jpg name", None),
        "truncated_jpg": ("trunc.jpg", good_jpg[: len(good_jpg) // 2], b"truncated jpeg file", "truncated"),
        "truncated_png": ("trunc.png", good_png[: len(good_png) // 2], b"truncated png file", "truncated"),
        "zero_bytes": ("zero.png", b"", b"zero byte image file", "empty_file"),
        "wrong_extension": ("notimage.jpg", b"%PDF-1.4 not really an image\n" * 20, b"a pdf named jpg",
                            "undecodable"),
        "bomb": ("bomb.png", bomb, b"decompression bomb image", "decompression_bomb"),
        "one_pixel": ("tiny.png", _png(Image.new("RGB", (1, 1), (9, 9, 9))), b"one pixel image", "too_small"),
        "animated": ("anim.gif", gif.getvalue(), b"an animated gif here", "animated"),
        "bad_utf8": ("badutf8.png", _png(photo(64, 64, 9)), b"caf\xe9 latin-1 caption", "caption_not_utf8"),
        "empty_caption": ("emptycap.png", _png(photo(64, 64, 10)), b" \t\n ", "caption_empty"),
        "huge_caption": ("hugecap.png", _png(photo(64, 64, 11)), b"word " * 50000, "caption_too_long"),
        "no_caption": ("nocap.png", _png(photo(64, 64, 12)), None, "caption_missing"),
        "duplicate": ("dup_of_ctrl.png", _png(photo(64, 96, 7)), b"same pixels as ctrl", "duplicate"),
    }


def build_folder(root: Path, n_shapes: int = 24, seed: int = 0) -> dict:
    """Shapes + every special input; returns expected good source ids and rejects."""
    root.mkdir(parents=True, exist_ok=True)
    generate(root / "shapes", ShapesConfig(n=n_shapes, seed=seed, size=64), progress=False)
    good = {f"shapes/{i:06d}.png" for i in range(n_shapes)}
    rejects: dict[str, str] = {}
    sp = root / "special"
    sp.mkdir(exist_ok=True)
    for _name, (fname, data, cap, reason) in special_inputs().items():
        (sp / fname).write_bytes(data)
        if cap is not None:
            (sp / fname).with_suffix(".txt").write_bytes(cap)
        sid = f"special/{fname}"
        if reason:
            rejects[sid] = reason
        else:
            good.add(sid)
    # a caption whose image is in a format we do not read
    (sp / "vector.svg").write_text("<svg/>")
    (sp / "vector.txt").write_text("an svg drawing")
    rejects["special/vector.svg"] = "unsupported_format"
    return {"good": good, "rejects": rejects}
