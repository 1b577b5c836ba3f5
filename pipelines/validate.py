"""Decode/validate images and captions; filters; duplicate detection. Pure functions, no Ray.

Every way an input can be bad ends as a :class:`Reject` with a short machine-readable reason
(counted in stats, listed in rejects.jsonl) - never a crash of the job.
"""

from __future__ import annotations

import hashlib
import io
import struct
import unicodedata
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipelines.config import DecodeConfig, FilterConfig

# Truncated files must fail, not be silently padded with gray.
ImageFile.LOAD_TRUNCATED_IMAGES = False

REASONS = (
    "empty_file", "file_too_large", "undecodable", "unsupported_format", "decompression_bomb",
    "truncated", "animated", "too_small", "aspect_ratio", "caption_missing", "caption_not_utf8",
    "caption_empty", "caption_too_long", "caption_too_short", "duplicate", "near_duplicate",
    "duplicate_source_id", "low_score", "unsafe_member", "image_missing", "read_error", "corrupt_tar",
    "invalid_row", "changed_since_scan", "class_missing", "unknown_class",
)


class Reject(Exception):
    """An input that is not used; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------- captions

# Format characters kept: zero-width joiner/non-joiner carry meaning inside emoji and some scripts.
_KEEP_CF = {"\u200c", "\u200d"}


def clean_caption(raw: bytes | str | None, cfg: FilterConfig) -> str:
    """UTF-8 decode, NFC, strip control/format chars, collapse whitespace, then length checks."""
    if raw is None:
        raise Reject("caption_missing")
    if isinstance(raw, bytes):
        if len(raw) > 8 * cfg.caption_max_chars + 1024:  # cannot shrink below the limit: don't decode
            raise Reject("caption_too_long", f"{len(raw)} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Reject("caption_not_utf8", f"byte {e.start}") from None
    else:
        text = raw
    text = unicodedata.normalize("NFC", text.lstrip("\ufeff"))
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch.isspace():
            out.append(" ")
        elif cat in ("Cc", "Cs", "Co") or (cat == "Cf" and ch not in _KEEP_CF):
            continue
        else:
            out.append(ch)
    text = " ".join("".join(out).split())
    if not text:
        raise Reject("caption_empty")
    if len(text) > cfg.caption_max_chars:
        raise Reject("caption_too_long", f"{len(text)} chars > {cfg.caption_max_chars}")
    if len(text) < cfg.caption_min_chars or len(text.split()) < cfg.caption_min_words:
        raise Reject("caption_too_short", repr(text[:40]))
    return text


# ----------------------------------------------------------------------------- images


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; alpha is composited on white, 16-bit is scaled (not clipped)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if (mode.startswith("I;16") or a.max() > 255) else 255.0
        if mode == "I" and a.max() > 65535:
            top = float(a.max())
        a8 = np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img, mask=img.getchannel("A"))
        return bg
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_image(data: bytes, cfg: DecodeConfig) -> Image.Image:
    """Validated, EXIF-oriented RGB image from raw bytes; raises :class:`Reject`."""
    if not data:
        raise Reject("empty_file")
    if len(data) > cfg.max_file_bytes:
        raise Reject("file_too_large", f"{len(data)} bytes > {cfg.max_file_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise Reject("decompression_bomb", str(e)[:120]) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise Reject("undecodable", type(e).__name__) from None
    fmt = img.format or "?"
    if fmt not in cfg.formats:
        raise Reject("unsupported_format", fmt)
    w, h = img.size
    if w * h > cfg.max_pixels:
        raise Reject("decompression_bomb", f"{w}x{h} > {cfg.max_pixels} pixels")
    if getattr(img, "n_frames", 1) > 1:
        if cfg.animated == "reject":
            raise Reject("animated", f"{img.n_frames} frames")
        img.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except Image.DecompressionBombError as e:
        raise Reject("decompression_bomb", str(e)[:120]) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise Reject("truncated", f"{type(e).__name__}: {str(e)[:80]}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to lose the pixels
        pass
    return _to_rgb(img)


def check_image(img: Image.Image, cfg: FilterConfig) -> None:
    """Size filters (after EXIF rotation)."""
    w, h = img.size
    if min(w, h) < cfg.min_side:
        raise Reject("too_small", f"{w}x{h} < min_side {cfg.min_side}")
    if max(w, h) / min(w, h) > cfg.max_aspect:
        raise Reject("aspect_ratio", f"{w}x{h} > max_aspect {cfg.max_aspect}")


def pixel_hash(img: Image.Image) -> str:
    """Exact-duplicate key: identical pixels hash alike whatever the container/encoder."""
    h = hashlib.sha256(f"{img.size[0]}x{img.size[1]}".encode())
    h.update(img.tobytes())
    return h.hexdigest()[:32]


def perceptual_hash(img: Image.Image) -> int:
    """64-bit pHash (imagehash library) as an int."""
    import imagehash

    return int(str(imagehash.phash(img, hash_size=8)), 16)
