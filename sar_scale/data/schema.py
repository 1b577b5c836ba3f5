"""The shard format shared by the writers (``pipelines/``, debug/demo data) and the reader (``data/loader.py``).

Format v2 (``SCHEMA_VERSION = 2``, docs/shard-format.md) is the contract: aspect-bucket shards, a
compact per-shard ``index.npy`` (:data:`INDEX_DTYPE`) and ``hashes.npy`` (:data:`HASHES_DTYPE`),
``stats.json`` written last as the commit marker, a manifest with per-shard grids. Functions:
``make_shard_stats`` / ``validate_shard_stats`` / ``read_shard_stats``, ``read_index``,
``read_hashes``, ``make_dataset_manifest`` / ``validate_dataset_manifest`` / ``read_dataset_manifest``
/ ``write_dataset_manifest``; shards are written by :func:`sar_scale.data.shards.commit_shard`.
Readers refuse v1 data (a JSON object per sample in ``stats.json``) with a :class:`SchemaError`.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np

from sar_scale.data.storage import Storage

SCHEMA_VERSION = 2
SCHEMA_VERSION_V1 = 1  # recognised only to refuse v1 data with a clear message

# Member extensions (the part after "{key}." in the tar).
TXT = "txt"
JSON = "json"
TEXT_FEATURES = "text.npy"  # float16 [len, D], valid tokens only
THUMBNAIL = "jpg"
TOKENS_RE = re.compile(r"^tokens_(\d+)\.npy$")

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
SHARD_DIGITS = 6
_SHARD_RE = re.compile(r"^(?P<name>.+)-(?P<index>\d{6})\.(?P<kind>tar|stats\.json|index\.npy|hashes\.npy)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
KEY_LEN = 20  # hex chars of sha256: 80 bits, collision-free in practice at billions of samples


class SchemaError(ValueError):
    """A shard, stats file or manifest does not follow the schema; message names the file/field."""


def tokens_member(res: int | str) -> str:
    """Member extension holding the token grid for base resolution ``res`` (e.g. ``tokens_256.npy``)."""
    return f"tokens_{int(res)}.npy"


def sample_key(source_id: str) -> str:
    """Deterministic ``__key__`` from the source id: a rerun writes the same key for the same input.

    Hashed because webdataset splits member names at the first dot and source ids are paths/URLs.
    """
    if not source_id:
        raise ValueError("sample_key: source_id must be a non-empty string")
    return hashlib.sha256(source_id.encode("utf-8")).hexdigest()[:KEY_LEN]


def check_name(name: str) -> str:
    if not _NAME_RE.match(name or ""):
        raise ValueError(f"invalid shard name {name!r}: use letters, digits, '_', '-', '.'")
    return name


def shard_stem(name: str, index: int) -> str:
    if index < 0 or index >= 10**SHARD_DIGITS:
        raise ValueError(f"shard index {index} out of range [0, {10**SHARD_DIGITS})")
    return f"{check_name(name)}-{index:0{SHARD_DIGITS}d}"


def tar_name(name: str, index: int) -> str:
    return shard_stem(name, index) + ".tar"


def stats_name(name: str, index: int) -> str:
    return shard_stem(name, index) + ".stats.json"


def index_name(name: str, index: int) -> str:
    """Key of shard ``index``'s compact per-sample index (``{name}-{i:06d}.index.npy``)."""
    return shard_stem(name, index) + ".index.npy"


def hashes_name(name: str, index: int) -> str:
    """Key of shard ``index``'s dedup hashes (``{name}-{i:06d}.hashes.npy``)."""
    return shard_stem(name, index) + ".hashes.npy"


def parse_shard_name(key: str) -> tuple[str, int, str] | None:
    """``"sub/x-000003.tar"`` -> ``("x", 3, "tar")``; kinds: tar, stats.json, index.npy, hashes.npy;
    None for anything else."""
    m = _SHARD_RE.match(key.rsplit("/", 1)[-1])
    if not m:
        return None
    return m["name"], int(m["index"]), m["kind"]


def brace_pattern(name: str, num_shards: int) -> str:
    """webdataset brace URL tail, e.g. ``x-{000000..000003}.tar``."""
    if num_shards < 1:
        raise ValueError("brace_pattern: num_shards must be >= 1")
    if num_shards == 1:
        return tar_name(name, 0)
    return f"{check_name(name)}-{{{0:0{SHARD_DIGITS}d}..{num_shards - 1:0{SHARD_DIGITS}d}}}.tar"


# ----------------------------------------------------------------------------- encode / decode


def encode_npy(arr: np.ndarray) -> bytes:
    """``.npy`` bytes (same format webdataset's default encoder writes and ``np.load`` reads)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes | memoryview) -> np.ndarray:
    """The array in ``.npy`` bytes as a read-only view of ``data`` (no copy; object arrays refused).

    Only the header goes through numpy's own parser (``np.lib.format``); the payload is not copied,
    which matters at the training reader's rate (a 900M-run sample holds ~0.5 MB of text features).
    """
    buf = memoryview(data)
    if len(buf) < 10 or bytes(buf[:6]) != b"\x93NUMPY":
        raise ValueError("not .npy data (bad magic)")
    major = buf[6]
    if major not in (1, 2, 3):
        raise ValueError(f".npy format version {major} is not supported")
    n = 2 if major == 1 else 4
    start = 8 + n + int.from_bytes(buf[8:8 + n], "little")
    f = io.BytesIO(bytes(buf[:start]))
    version = np.lib.format.read_magic(f)
    shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                             else np.lib.format.read_array_header_2_0(f))
    if dtype.hasobject:
        raise ValueError(".npy holds Python objects (refused: it would need unpickling)")
    count = int(np.prod(shape, dtype=np.int64))
    if len(buf) - start < count * dtype.itemsize:
        raise ValueError(f".npy data is truncated: {len(buf) - start} bytes for {count} x {dtype}")
    return np.frombuffer(buf, dtype, count, start).reshape(shape, order="F" if fortran else "C")


def sample_json(source_id: str, orig_size: tuple[int, int], buckets: dict[int | str, tuple[int, int]],
                scores: dict[str, float] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The per-sample ``json`` member: source id, original ``[w, h]``, token grid per resolution, scores."""
    out: dict[str, Any] = {
        "source_id": source_id,
        "orig_size": [int(orig_size[0]), int(orig_size[1])],
        "buckets": {str(int(r)): [int(hw[0]), int(hw[1])] for r, hw in buckets.items()},
        "scores": {k: float(v) for k, v in (scores or {}).items()},
    }
    if extra:
        out["extra"] = extra
    return out


def make_sample(source_id: str, caption: str, tokens: dict[int, np.ndarray], orig_size: tuple[int, int],
                scores: dict[str, float] | None = None, text_features: np.ndarray | None = None,
                thumbnail_jpg: bytes | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A dict ready for ``webdataset.TarWriter.write`` (all values already bytes, so no encoder magic)."""
    sample: dict[str, Any] = {"__key__": sample_key(source_id), TXT: caption.encode("utf-8")}
    grids = {}
    for res, tok in tokens.items():
        if tok.ndim != 2:
            raise SchemaError(f"tokens for {source_id!r} at {res}: want a 2-D grid, got shape {tok.shape}")
        sample[tokens_member(res)] = encode_npy(tok.astype(np.int32, copy=False))
        grids[res] = tok.shape
    meta = sample_json(source_id, orig_size, grids, scores, extra)
    sample[JSON] = json.dumps(meta, sort_keys=True).encode("utf-8")
    if text_features is not None:
        if text_features.ndim != 2:
            raise SchemaError(f"text features for {source_id!r}: want [len, D], got {text_features.shape}")
        sample[TEXT_FEATURES] = encode_npy(text_features.astype(np.float16, copy=False))
    if thumbnail_jpg is not None:
        sample[THUMBNAIL] = thumbnail_jpg
    return sample


# ----------------------------------------------------------------------------- commits, rejects


def build_index(tar: str | Path | IO[bytes]) -> list[dict[str, Any]]:
    """Per sample: key, token grid per resolution, and ``[offset, size]`` of each member's data
    (a per-member index of any webdataset tar; shards carry the compact per-sample ``index.npy``).

    Reads the finished tar with :mod:`tarfile` (``TarInfo.offset_data``), so offsets are exactly
    what a Range GET needs. Samples keep tar order. Accepts a path or a readable stream.
    """
    index: list[dict[str, Any]] = []
    by_key: dict[str, dict[str, Any]] = {}
    # Stream mode ("r|") so a non-seekable S3 body works as well as a local file.
    with tarfile.open(name=str(tar) if isinstance(tar, (str, Path)) else None,
                      fileobj=None if isinstance(tar, (str, Path)) else tar, mode="r|") as tf:
        for ti in tf:
            if not ti.isfile():
                continue
            base = ti.name.rsplit("/", 1)[-1]
            if "." not in base:
                raise SchemaError(f"{tar}: member {ti.name!r} has no extension")
            key, ext = base.split(".", 1)
            if "/" in ti.name:
                key = ti.name.rsplit("/", 1)[0] + "/" + key
            entry = by_key.get(key)
            if entry is None:
                entry = by_key[key] = {"key": key, "buckets": {}, "members": {}}
                index.append(entry)
            entry["members"][ext] = [ti.offset_data, ti.size]
            if ext == JSON:
                f = tf.extractfile(ti)
                assert f is not None
                try:
                    meta = json.loads(f.read())
                    entry["buckets"] = {str(r): list(hw) for r, hw in meta.get("buckets", {}).items()}
                except (ValueError, AttributeError) as e:
                    raise SchemaError(f"{tar}: {ti.name} is not a valid sample json: {e}") from None
    return index


def committed_shards(storage: Storage, name: str | None = None, prefix: str = "") -> list[tuple[str, str]]:
    """``(tar_key, stats_key)`` of every committed shard (stats present AND tar present), sorted."""
    keys = set(storage.list(prefix))
    out = []
    for k in sorted(keys):
        parsed = parse_shard_name(k)
        if not parsed or parsed[2] != "stats.json" or (name is not None and parsed[0] != name):
            continue
        tar = k[: -len(".stats.json")] + ".tar"
        if tar in keys:
            out.append((tar, k))
    return out


def write_rejects(storage: Storage, rejects: Iterable[dict[str, Any]]) -> str:
    """``rejects.jsonl``: one ``{"source_id", "reason", ...}`` per line, sorted for reproducibility."""
    rows = sorted(rejects, key=lambda r: (str(r["source_id"]), str(r["reason"])))
    storage.put_bytes("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode("utf-8"), REJECTS)
    return REJECTS


def read_rejects(storage: Storage) -> list[dict[str, Any]]:
    text = storage.get_bytes(REJECTS).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ============================================================================= format v2
# docs/shard-format.md is the contract; every name below is its one definition in code.

INDEX_DTYPE = np.dtype([("key", f"S{KEY_LEN}"), ("start", "<u8"), ("end", "<u8")])
"""One row per sample in tar order: ``[start, end)`` spans the sample's members (headers included)."""
HASHES_DTYPE = np.dtype([("key", f"S{KEY_LEN}"), ("sha", "S16"), ("phash", "<u8")])
"""One row per sample in tar order: sha256 prefix of the decoded pixels and 64-bit perceptual hash."""

_V1_HINT = ("it was written by an older sar-scale (shard format v1); re-run `sar-scale data prepare` "
            "(or the debug/demo data command) to write format v2")


def _check_version(obj: dict[str, Any], source: str) -> None:
    v = obj.get("schema_version")
    if v == SCHEMA_VERSION:
        return
    if v in (None, SCHEMA_VERSION_V1) or isinstance(obj.get("index"), list):
        raise SchemaError(f"{source}: {_V1_HINT}")
    raise SchemaError(f"{source}: schema_version {v!r} is not supported (this sar-scale reads {SCHEMA_VERSION})")


def _load_json(storage: Storage, key: str) -> Any:
    try:
        return json.loads(storage.get_bytes(key))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SchemaError(f"{storage.url(key)}: invalid JSON: {e}") from None


def normalize_grids(grids: dict[Any, Any], source: str = "grids") -> dict[str, list[int]]:
    """``{256: (16, 16)}`` -> ``{"256": [16, 16]}`` (sorted by resolution); SchemaError when malformed."""
    if not isinstance(grids, dict) or not grids:
        raise SchemaError(f"{source}: want a non-empty object {{resolution: [h, w]}}")
    out: dict[str, list[int]] = {}
    for r, hw in sorted(grids.items(), key=lambda kv: int(kv[0])):
        try:
            h, w = (int(v) for v in hw)
            res = int(r)
        except (TypeError, ValueError):
            raise SchemaError(f"{source}: entry {r!r}: {hw!r} is not a resolution -> [h, w]") from None
        if res <= 0 or h <= 0 or w <= 0:
            raise SchemaError(f"{source}: entry {r!r}: {hw!r} must be positive")
        out[str(res)] = [h, w]
    return out


def grid_name(hw: Iterable[int]) -> str:
    """``[16, 24]`` -> ``"16x24"`` (the bucket name used in the manifest's ``buckets``)."""
    h, w = hw
    return f"{int(h)}x{int(w)}"


def make_shard_stats(name: str, index: int, samples: int, nbytes: int, grids: dict[Any, Any],
                     index_bytes: int, *, rejects: dict[str, int] | None = None, hashes: bool = False,
                     run: str = "", extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The v2 ``stats.json`` of shard ``index`` (validated). ``extra`` adds writer fields."""
    stem = shard_stem(name, index)
    stats: dict[str, Any] = dict(extra or {})
    stats.update({
        "schema_version": SCHEMA_VERSION, "shard": stem, "samples": int(samples), "bytes": int(nbytes),
        "rejects": {str(k): int(v) for k, v in sorted((rejects or {}).items())},
        "grids": normalize_grids(grids, f"{stem} grids"), "index": index_name(name, index),
        "index_bytes": int(index_bytes), "hashes": hashes_name(name, index) if hashes else None,
        "run": str(run)})
    return validate_shard_stats(stats, stats_name(name, index))


def validate_shard_stats(stats: Any, source: str = "stats.json") -> dict[str, Any]:
    """Check a v2 ``stats.json``; raises :class:`SchemaError` naming the file and field (v1 included)."""
    if not isinstance(stats, dict):
        raise SchemaError(f"{source}: top level must be an object")
    _check_version(stats, source)
    for field, typ in (("shard", str), ("samples", int), ("bytes", int), ("rejects", dict), ("grids", dict),
                       ("index", str), ("index_bytes", int), ("run", str)):
        if field not in stats:
            raise SchemaError(f"{source}: missing field '{field}'")
        if not isinstance(stats[field], typ) or isinstance(stats[field], bool):
            raise SchemaError(f"{source}: field '{field}' must be {typ.__name__}")
    if stats["samples"] < 0 or stats["bytes"] < 0:
        raise SchemaError(f"{source}: 'samples' and 'bytes' must be >= 0")
    if stats.get("hashes") is not None and not isinstance(stats["hashes"], str):
        raise SchemaError(f"{source}: field 'hashes' must be a key or null")
    want = INDEX_DTYPE.itemsize * stats["samples"]
    if stats["index_bytes"] < want:
        raise SchemaError(f"{source}: 'index_bytes' {stats['index_bytes']} is too small for "
                          f"{stats['samples']} samples")
    normalize_grids(stats["grids"], f"{source} 'grids'")
    return stats


def read_shard_stats(storage: Storage, key: str) -> dict[str, Any]:
    """Load + validate a v2 ``stats.json`` (a v1 one raises :class:`SchemaError` saying to re-run)."""
    return validate_shard_stats(_load_json(storage, key), storage.url(key))


def _stem_of(key: str, suffix: str) -> str:
    if not key.endswith(suffix):
        raise SchemaError(f"{key}: want a key ending in {suffix}")
    return key[: -len(suffix)]


def _load_npy(storage: Storage, key: str, dtype: np.dtype) -> np.ndarray:
    data = storage.get_bytes(key)
    try:
        arr = decode_npy(data)
    except (ValueError, OSError, EOFError) as e:
        raise SchemaError(f"{storage.url(key)}: not a valid .npy: {e}") from None
    if arr.dtype != dtype or arr.ndim != 1:
        raise SchemaError(f"{storage.url(key)}: want a 1-D array of dtype {dtype.descr}, got "
                          f"{arr.dtype.descr} with shape {arr.shape}")
    return arr


def validate_index(index: np.ndarray, stats: dict[str, Any], source: str = "index.npy") -> np.ndarray:
    """Rows == stats ``samples``; ranges non-empty, sorted, non-overlapping, within the tar's bytes;
    keys strictly increasing (samples are sorted by key inside a shard)."""
    if index.dtype != INDEX_DTYPE or index.ndim != 1:
        raise SchemaError(f"{source}: want a 1-D array of dtype {INDEX_DTYPE.descr}")
    if len(index) != stats["samples"]:
        raise SchemaError(f"{source}: {len(index)} rows but stats 'samples' is {stats['samples']}")
    if len(index):
        start, end = index["start"], index["end"]
        if np.any(end <= start):
            raise SchemaError(f"{source}: a row has end <= start")
        if np.any(start[1:] < end[:-1]):
            raise SchemaError(f"{source}: byte ranges are not sorted / overlap")
        if int(end[-1]) > stats["bytes"]:
            raise SchemaError(f"{source}: range ends at byte {int(end[-1])}, beyond the tar's {stats['bytes']}")
        keys = index["key"]
        if np.any(keys[1:] <= keys[:-1]):
            raise SchemaError(f"{source}: keys are not strictly increasing")
    return index


def read_index(storage: Storage, key: str, stats: dict[str, Any] | None = None) -> np.ndarray:
    """Load a shard's ``index.npy`` and validate it against its ``stats.json`` (read from the sibling
    ``{stem}.stats.json`` unless given): a structured array of :data:`INDEX_DTYPE`."""
    stem = _stem_of(key, ".index.npy")
    if stats is None:
        stats = read_shard_stats(storage, stem + ".stats.json")
    return validate_index(_load_npy(storage, key, INDEX_DTYPE), stats, storage.url(key))


def read_hashes(storage: Storage, key: str, stats: dict[str, Any] | None = None) -> np.ndarray:
    """Load a shard's ``hashes.npy`` (:data:`HASHES_DTYPE`), rows == stats ``samples``."""
    stem = _stem_of(key, ".hashes.npy")
    if stats is None:
        stats = read_shard_stats(storage, stem + ".stats.json")
    arr = _load_npy(storage, key, HASHES_DTYPE)
    if len(arr) != stats["samples"]:
        raise SchemaError(f"{storage.url(key)}: {len(arr)} rows but stats 'samples' is {stats['samples']}")
    return arr


def shard_entry(stats: dict[str, Any]) -> dict[str, Any]:
    """The manifest's summary of one committed shard, from its (validated) stats."""
    stem = stats["shard"]
    return {"tar": stem + ".tar", "stats": stem + ".stats.json", "index": stats["index"],
            "samples": stats["samples"], "bytes": stats["bytes"], "grids": stats["grids"]}


def make_dataset_manifest(shards: list[dict[str, Any]], resolutions: Iterable[int], text_features: bool,
                          config_hash: str, versions: dict[str, str], runs: list[dict[str, Any]],
                          extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The v2 ``manifest.json``: ``shards`` are :func:`shard_entry` dicts in shard order; ``buckets``
    (resolution -> grid name -> samples) and ``samples`` are derived from them."""
    res = [int(r) for r in resolutions]
    buckets: dict[str, dict[str, int]] = {str(r): {} for r in res}
    for s in shards:
        for r, hw in s["grids"].items():
            if r in buckets:
                g = grid_name(hw)
                buckets[r][g] = buckets[r].get(g, 0) + int(s["samples"])
    man: dict[str, Any] = dict(extra or {})
    man.update({"schema_version": SCHEMA_VERSION, "samples": int(sum(int(s["samples"]) for s in shards)),
                "resolutions": res, "text_features": bool(text_features), "config_hash": str(config_hash),
                "versions": dict(versions), "runs": list(runs), "shards": list(shards),
                "buckets": {r: dict(sorted(c.items())) for r, c in buckets.items()}})
    return validate_dataset_manifest(man)


def validate_dataset_manifest(man: Any, source: str = MANIFEST) -> dict[str, Any]:
    """Check a v2 manifest (a v1 one raises :class:`SchemaError` saying to re-run)."""
    if not isinstance(man, dict):
        raise SchemaError(f"{source}: top level must be an object")
    _check_version(man, source)
    for field, typ in (("shards", list), ("resolutions", list), ("buckets", dict), ("samples", int),
                       ("config_hash", str), ("versions", dict), ("text_features", bool), ("runs", list)):
        if field not in man:
            raise SchemaError(f"{source}: missing field '{field}'")
        if not isinstance(man[field], typ):
            raise SchemaError(f"{source}: field '{field}' must be {typ.__name__}")
    total = 0
    for i, s in enumerate(man["shards"]):
        if not isinstance(s, dict) or not {"tar", "stats", "index", "samples", "bytes", "grids"} <= set(s):
            raise SchemaError(f"{source}: shards[{i}] needs 'tar', 'stats', 'index', 'samples', 'bytes', 'grids'")
        if not isinstance(s["samples"], int) or s["samples"] < 0:
            raise SchemaError(f"{source}: shards[{i}].samples must be an int >= 0")
        normalize_grids(s["grids"], f"{source}: shards[{i}].grids")
        total += s["samples"]
    if total != man["samples"]:
        raise SchemaError(f"{source}: 'samples' is {man['samples']} but the shards hold {total}")
    for i, r in enumerate(man["runs"]):
        if not isinstance(r, dict) or not {"run", "shards"} <= set(r):
            raise SchemaError(f"{source}: runs[{i}] needs 'run' and 'shards'")
    return man


def write_dataset_manifest(storage: Storage, manifest: dict[str, Any]) -> str:
    """Replace ``manifest.json`` atomically (validated first)."""
    validate_dataset_manifest(manifest)
    storage.put_bytes(json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8"), MANIFEST)
    return MANIFEST


def read_dataset_manifest(storage: Storage) -> dict[str, Any]:
    """Load + validate the v2 manifest; SchemaError for v1 data (re-run prepare) or a bad file."""
    return validate_dataset_manifest(_load_json(storage, MANIFEST), storage.url(MANIFEST))
