"""The one decoder of untrusted image bytes, shared by `data prepare` (pipelines/) and `tokenizer train`:
size and pixel-count limits before decoding, format allow-list, animated frames, truncation, EXIF
orientation, any PIL mode to 8-bit RGB. Every way an input can be bad ends as a :class:`Reject`
with a short machine-readable reason (counted in stats, listed in rejects.jsonl) - never a crash.
"""

from __future__ import annotations

import io
import struct
import warnings
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from pydantic import Field

from sar_scale.config import StrictModel

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


class DecodeConfig(StrictModel):
    """Image validation: what counts as a readable, safe image."""

    max_pixels: int = Field(64_000_000, ge=1)
    """Decompression-bomb guard: width*height from the header above this is rejected before decoding."""
    max_file_bytes: int = Field(50 * 2**20, ge=1)
    """Files larger than this are rejected unread (file_too_large)."""
    formats: list[str] = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"]
    """Accepted decoded formats (PIL names); others are rejected as unsupported_format."""
    animated: Literal["reject", "first_frame"] = "reject"
    """Animated GIF/WebP/APNG: reject, or keep the first frame."""


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


__all__ = ["REASONS", "DecodeConfig", "Reject", "decode_image"]
