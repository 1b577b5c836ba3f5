"""The bad-input corpus of the fault suite: every kind of broken or odd image, caption and tar member.

Each entry says what must happen to it: ``reject:<reason>`` (listed in rejects.jsonl with that
reason) or ``normalise`` (accepted, converted to a clean RGB sample / cleaned caption). Files are
built here from scratch (no downloads), deterministically.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


def photo(w: int, h: int, seed: int) -> Image.Image:
    """A smooth, distinct RGB image per seed (distinct pixels and perceptual hashes)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    fx, fy, ph = 3 + 9 * rng.random(), 3 + 9 * rng.random(), 6.3 * rng.random()
    a = np.stack([np.sin(xx / fx + ph) * 110 + 128, np.cos(yy / fy + 2 * ph) * 110 + 128,
                  np.sin((xx + yy) / (fx + fy) + 3 * ph) * 110 + 128], -1)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8), "RGB")


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def _png_header_only(w: int, h: int) -> bytes:
    """A syntactically valid PNG whose header claims ``w x h`` pixels (the data is one tiny IDAT)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


@dataclass(frozen=True)
class Case:
    kind: str  # what is wrong with it
    file: str  # image file name in the input folder ("" = no image file)
    data: bytes
    caption: bytes | None  # None = no .txt next to it
    expect: str  # "normalise" or "reject:<reason>"


def bad_cases() -> list[Case]:
    """All kinds of bad or odd input a web-scale folder holds (>= 15 kinds, each with its fate)."""
    good_jpg = _save(photo(96, 80, 101), "JPEG", quality=90)
    good_png = _save(photo(96, 80, 102), "PNG")
    a16 = np.linspace(0, 65535, 96 * 80).reshape(80, 96).astype(np.uint16)
    pal = photo(80, 80, 104).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    frames = [photo(80, 80, 110 + i) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    gray_alpha = Image.merge("LA", [photo(80, 96, 112).convert("L"), Image.new("L", (80, 96), 128)])
    cap = b"a smooth colourful pattern of waves"
    return [
        Case("truncated_jpeg", "trunc.jpg", good_jpg[: len(good_jpg) // 2], cap, "reject:truncated"),
        Case("truncated_png", "trunc.png", good_png[: len(good_png) // 2], cap, "reject:truncated"),
        Case("zero_bytes", "zero.jpg", b"", cap, "reject:empty_file"),
        Case("not_an_image", "report.jpg", b"%PDF-1.4\n" + b"0 0 obj << >> endobj\n" * 40, cap,
             "reject:undecodable"),
        Case("random_bytes", "noise.png", np.random.default_rng(5).bytes(3000), cap, "reject:undecodable"),
        Case("wrong_extension", "really_png.jpg", _save(photo(90, 72, 103), "PNG"), cap, "normalise"),
        Case("decompression_bomb", "bomb.png", _save(Image.new("1", (9000, 9000)), "PNG", optimize=True), cap,
             "reject:decompression_bomb"),
        Case("huge_dimensions", "huge.png", _png_header_only(100_000, 100_000), cap,
             "reject:decompression_bomb"),
        Case("extreme_aspect", "strip.png", _save(photo(1200, 96, 105), "PNG"), cap, "reject:aspect_ratio"),
        Case("one_pixel", "dot.png", _save(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), cap,
             "reject:too_small"),
        Case("cmyk", "cmyk.jpg", _save(photo(88, 72, 106).convert("CMYK"), "JPEG", quality=90), cap, "normalise"),
        Case("16_bit", "gray16.png", _save(Image.fromarray(a16), "PNG"), cap, "normalise"),
        Case("palette_alpha", "palette.png", _save(pal, "PNG", transparency=0), cap, "normalise"),
        Case("gray_alpha", "gray_alpha.png", _save(gray_alpha, "PNG"), cap, "normalise"),
        Case("animated_gif", "anim.gif", gif.getvalue(), cap, "reject:animated"),
        Case("exif_rotated", "rotated.jpg", _save(photo(72, 120, 107), "JPEG", exif=exif.tobytes()), cap,
             "normalise"),
        Case("non_utf8_caption", "latin1.png", _save(photo(80, 80, 108), "PNG"), "caf\xe9 cr\xe8me".encode("latin-1"),
             "reject:caption_not_utf8"),
        Case("empty_caption", "emptycap.png", _save(photo(80, 80, 109), "PNG"), b" \t \r\n ", "reject:caption_empty"),
        Case("huge_caption", "hugecap.png", _save(photo(80, 80, 113), "PNG"), b"y" * 100_000,
             "reject:caption_too_long"),
        Case("control_chars", "ctrl.png", _save(photo(80, 96, 114), "PNG"),
             "a blue\x00 wave\x07 \x1b[31mpattern\u200b here\r\n".encode(), "normalise"),
        Case("missing_caption", "nocap.png", _save(photo(80, 80, 115), "PNG"), None, "reject:caption_missing"),
        Case("orphan_caption", "", b"", b"a caption without its image", "reject:image_missing"),
        Case("unsupported_format", "vector.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>", cap,
             "reject:unsupported_format"),
        Case("exact_duplicate", "dup_of_ctrl.png", _save(photo(80, 96, 114), "PNG"), b"the same pixels again",
             "reject:duplicate"),
    ]


def source_id(case: Case, sub: str = "bad") -> str:
    """The pipeline's source id of a case in a folder input (path relative to the input root)."""
    if not case.file:
        return f"{sub}/{case.kind}.txt"
    return f"{sub}/{case.file}"


def write_folder(root: Path, n_good: int = 24, seed: int = 0, sub: str = "bad") -> dict[str, str]:
    """Good images ``good/NNN.png`` + every bad case under ``sub/``; returns source id -> expected fate."""
    expect: dict[str, str] = {}
    (root / "good").mkdir(parents=True, exist_ok=True)
    sizes = [(96, 96), (128, 80), (80, 128), (112, 96)]
    for i in range(n_good):
        w, h = sizes[i % len(sizes)]
        (root / "good" / f"{i:03d}.png").write_bytes(_save(photo(w, h, seed * 1000 + i), "PNG"))
        (root / "good" / f"{i:03d}.txt").write_text(f"a pattern of waves number {i}")
        expect[f"good/{i:03d}.png"] = "accept"
    (root / sub).mkdir(parents=True, exist_ok=True)
    for c in bad_cases():
        stem = c.kind if not c.file else c.file.rsplit(".", 1)[0]
        if c.file:
            (root / sub / c.file).write_bytes(c.data)
        if c.caption is not None:
            (root / sub / f"{stem}.txt").write_bytes(c.caption)
        expect[source_id(c, sub)] = c.expect
    return expect


def evil_tar(path: Path, outside_target: Path) -> dict[str, str]:
    """An input tar with traversal, absolute, link and device members next to good samples.

    ``outside_target`` is where a naive ``extractall`` would write; the pipeline must never
    create it. Returns member/sample source id -> expected fate (ids as the tar scanner names them).
    """
    key = path.name
    good = [(f"ok{i}", _save(photo(96, 96, 200 + i), "PNG"), f"a good tar sample {i}".encode()) for i in range(3)]
    rel_escape = "../" * 12 + str(outside_target).lstrip("/")
    expect: dict[str, str] = {}

    def add(tf: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
        ti = tarfile.TarInfo(name)
        ti.type, ti.linkname, ti.mtime = kind, link, 0
        ti.size = len(data) if kind == tarfile.REGTYPE else 0
        tf.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, png, cap in good[:2]:
            add(tf, f"{name}.png", png)
            add(tf, f"{name}.txt", cap)
            expect[f"{key}/{name}"] = "accept"
        add(tf, rel_escape, b"owned")
        expect[f"{key}/{rel_escape}"] = "reject:unsafe_member"
        add(tf, str(outside_target) + ".abs", b"owned")
        expect[f"{key}/{outside_target}.abs"] = "reject:unsafe_member"
        add(tf, "link.png", kind=tarfile.SYMTYPE, link=str(outside_target))
        expect[f"{key}/link.png"] = "reject:unsafe_member"
        add(tf, "hard.png", kind=tarfile.LNKTYPE, link="/etc/passwd")
        expect[f"{key}/hard.png"] = "reject:unsafe_member"
        add(tf, "dev.png", kind=tarfile.CHRTYPE)
        expect[f"{key}/dev.png"] = "reject:unsafe_member"
        name, png, cap = good[2]
        add(tf, f"{name}.png", png)
        add(tf, f"{name}.txt", cap)
        expect[f"{key}/{name}"] = "accept"
    return expect
