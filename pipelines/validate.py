"""Captions, size filters and duplicate keys of `data prepare`. Pure functions, no Ray.

Images are decoded by :mod:`sar_scale.data.decode` (shared with `tokenizer train`); every way an
input can be bad ends as a :class:`~sar_scale.data.decode.Reject` - never a crash of the job.
"""

from __future__ import annotations

import hashlib
import unicodedata

from PIL import Image

from pipelines.config import FilterConfig
from sar_scale.data.decode import Reject

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
