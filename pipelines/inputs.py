"""Enumerate inputs into scan units, and read them: image folders, JSONL/Parquet manifests, tars.

A *record* names one candidate sample: ``{"source_id", "img": ref, "cap": ref | None,
"caption": str | None, "extra": dict | None}`` where a ref is ``{"root": storage URL, "key": key,
"range": [offset, size] | None}``. Refs are re-read in the shard pass, so nothing but small
metadata travels through the driver.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from pipelines.config import InputConfig
from sar_scale.data.decode import Reject
from sar_scale.data.storage import Storage, StorageError, StorageNotFound, open_storage, parse_s3_url

logger = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXT = ".txt"

_STORAGES: dict[str, Storage] = {}


def storage_for(root: str) -> Storage:
    """One Storage per root per process (workers reuse their boto3 clients)."""
    st = _STORAGES.get(root)
    if st is None:
        st = _STORAGES[root] = open_storage(root)
    return st


def read_ref(ref: dict[str, Any]) -> bytes:
    """Bytes of a ref; raises :class:`Reject` ``read_error`` when it cannot be read."""
    st = storage_for(ref["root"])
    try:
        if ref.get("range"):
            off, size = ref["range"]
            return st.get_range(ref["key"], off, size)
        return st.get_bytes(ref["key"])
    except StorageNotFound:
        raise Reject("read_error", f"not found: {ref['key']}") from None
    except (StorageError, OSError) as e:
        raise Reject("read_error", str(e)[:160]) from None


def _split_url(path: str) -> tuple[str, str]:
    """An input location -> (storage root, key) for a single file."""
    if path.startswith("s3://"):
        bucket, key = parse_s3_url(path)
        return f"s3://{bucket}", key
    p = Path(path).expanduser().resolve()
    return "/", str(p).lstrip("/")


def _input_root(path: str) -> Storage:
    if not path.startswith("s3://") and not Path(path).expanduser().is_dir():
        raise ValueError(f"input.path: folder not found: {path}")
    return open_storage(path)


def iter_units(cfg: InputConfig) -> Iterator[dict[str, Any]]:
    """Scan units of the inputs, lazily and deterministically (same inputs -> same units in the same
    order): folders and tar prefixes are listed page by page, manifests are split into Parquet row
    groups / JSONL byte ranges that the scan tasks read. Nothing here grows with the input count."""
    if cfg.kind == "folder":
        yield from _folder_units(cfg)
    elif cfg.kind == "imagefolder":
        yield from _imagefolder_units(cfg)
    elif cfg.kind == "manifest":
        yield from _manifest_units(cfg)
    else:
        for root, key in _tar_list(cfg.path):
            yield {"kind": "tar", "root": root, "key": key}


def _folder_units(cfg: InputConfig) -> Iterator[dict[str, Any]]:
    """Group a sorted listing into stems (image + same-stem caption) and chunk them into units.

    Keys sharing the prefix ``stem + "."`` are contiguous in sorted order, so a stem is complete as soon
    as the listing moves past that prefix: only the few open stems are held, never the listing."""
    st = _input_root(cfg.path)
    records: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    open_stems: dict[str, list[str]] = {}
    ignored = 0

    def close(stem: str) -> None:
        nonlocal ignored
        exts = open_stems.pop(stem)
        lower = {e.lower(): e for e in exts}
        cap_ext = lower.get(CAPTION_EXT)
        images = sorted(e for e in exts if e.lower() in IMAGE_EXTS)
        if not images:
            others = sorted(e for e in exts if e.lower() not in (CAPTION_EXT, ".json"))
            if cap_ext and others:
                rejects.append({"source_id": stem + others[0], "reason": "unsupported_format",
                                "detail": f"extension {others[0]}"})
            elif cap_ext:
                rejects.append({"source_id": stem + cap_ext, "reason": "image_missing"})
            else:
                ignored += len(exts)
            return
        for e in images:
            records.append({"source_id": stem + e, "img": {"root": st.root, "key": stem + e},
                            "cap": {"root": st.root, "key": stem + cap_ext} if cap_ext else None,
                            "caption": None, "extra": None})

    def flush(final: bool) -> Iterator[dict[str, Any]]:
        nonlocal records, rejects
        while len(records) >= cfg.files_per_unit or (final and (records or rejects)):
            unit = {"kind": "records", "records": records[: cfg.files_per_unit], "rejects": rejects}
            records, rejects = records[cfg.files_per_unit:], []
            yield unit

    for key in st.iter_list():
        for stem in [s for s in open_stems if not key.startswith(s + ".")]:
            close(stem)
        stem, ext = posixpath.splitext(key)
        open_stems.setdefault(stem, []).append(ext)
        yield from flush(False)
    for stem in sorted(open_stems):
        close(stem)
    yield from flush(True)
    if ignored:
        logger.info("input folder: ignored %d files that are neither images nor captions", ignored)


def _read_class_map(path: str) -> dict[str, int]:
    root, key = _split_url(path)
    try:
        text = storage_for(root).get_bytes(key).decode("utf-8")
    except StorageNotFound:
        raise ValueError(f"input.class_map: not found: {path}") from None
    if text.lstrip().startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"input.class_map {path}: invalid JSON ({e})") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in raw.values()):
            raise ValueError(f"input.class_map {path}: ids must be integers >= 0")
        mapping = {str(k): v for k, v in raw.items()}
    else:
        names = [ln.strip() for ln in text.splitlines() if ln.strip()]
        mapping = {n: i for i, n in enumerate(names)}
        if len(mapping) != len(names):
            raise ValueError(f"input.class_map {path}: a class name is listed twice")
    if len(set(mapping.values())) != len(mapping):
        raise ValueError(f"input.class_map {path}: two classes share an id")
    if not mapping:
        raise ValueError(f"input.class_map {path}: no classes")
    return mapping


def class_index(cfg: InputConfig) -> dict[str, int]:
    """Class name -> id of an imagefolder input: the mapping file, else the sorted class folder names
    (one streamed listing; only the names are kept)."""
    if cfg.class_map:
        return _read_class_map(cfg.class_map)
    names = sorted({k.split("/", 1)[0] for k in _input_root(cfg.path).iter_list() if "/" in k
                    and posixpath.splitext(k)[1].lower() in IMAGE_EXTS})
    if not names:
        raise ValueError(f"input.path: no class folders with images under {cfg.path} "
                         "(imagefolder expects root/<class_name>/<image>)")
    return {n: i for i, n in enumerate(names)}


def _imagefolder_units(cfg: InputConfig) -> Iterator[dict[str, Any]]:
    """``root/<class>/<image>``: caption = class name, ``extra.class_id``; optional flip copies; listed
    page by page and chunked into units of ``files_per_unit`` records."""
    st = _input_root(cfg.path)
    classes = class_index(cfg)
    records: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for key in st.iter_list():
        ext = posixpath.splitext(key)[1].lower()
        if ext in (CAPTION_EXT, ".json") or posixpath.basename(key).startswith("."):
            continue  # side files (labels, READMEs) are not samples
        if ext not in IMAGE_EXTS:
            rejects.append({"source_id": key, "reason": "unsupported_format", "detail": f"extension {ext or '(none)'}"})
        elif "/" not in key:
            rejects.append({"source_id": key, "reason": "class_missing",
                            "detail": "image at the root; imagefolder expects root/<class_name>/<image>"})
        elif key.split("/", 1)[0] not in classes:
            rejects.append({"source_id": key, "reason": "unknown_class",
                            "detail": f"{key.split('/', 1)[0]!r} is not in input.class_map"})
        else:
            name = key.split("/", 1)[0]
            extra = {"class_id": classes[name], "class_name": name}
            ref = {"root": st.root, "key": key}
            records.append({"source_id": key, "img": ref, "cap": None, "caption": name, "extra": extra})
            if cfg.flip:
                records.append({"source_id": key + "#flip", "img": {**ref, "flip": True}, "cap": None,
                                "caption": name, "extra": {**extra, "flip": True}})
        if len(records) >= cfg.files_per_unit:
            yield {"kind": "records", "records": records, "rejects": rejects}
            records, rejects = [], []
    if records or rejects:
        yield {"kind": "records", "records": records, "rejects": rejects}


class RangeFile(io.RawIOBase):
    """A seekable read-only file over ``Storage.get_range`` (pyarrow reads a Parquet footer and one row
    group through it: a few ranged GETs, never the whole file)."""

    def __init__(self, st: Storage, key: str):
        super().__init__()
        self.st, self.key, self.pos = st, key, 0
        self.length = st.size(key)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, off: int, whence: int = 0) -> int:
        self.pos = off if whence == 0 else self.pos + off if whence == 1 else self.length + off
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        if n:
            b[:n] = self.st.get_range(self.key, self.pos, n)
            self.pos += n
        return n


def _manifest_file(path: str) -> tuple[str, str, Storage]:
    root, key = _split_url(path)
    st = storage_for(root)
    if not st.exists(key):
        raise ValueError(f"input.path: manifest not found: {path}")
    return root, key, st


def _manifest_units(cfg: InputConfig) -> Iterator[dict[str, Any]]:
    root, key, st = _manifest_file(cfg.path)
    if cfg.path.endswith(".parquet"):
        import pyarrow.parquet as pq

        with RangeFile(st, key) as f:
            meta = pq.ParquetFile(f).metadata
        if cfg.image_column not in meta.schema.names:
            raise ValueError(f"{cfg.path}: no column {cfg.image_column!r} (input.image_column); "
                             f"columns: {sorted(meta.schema.names)}")
        row0 = 0
        for g in range(meta.num_row_groups):
            yield {"kind": "parquet", "root": root, "key": key, "group": g, "row0": row0}
            row0 += meta.row_group(g).num_rows
        return
    size = st.size(key)
    first = st.get_range(key, 0, min(size, 1 << 16)).split(b"\n", 1)[0]
    try:
        row = json.loads(first) if first.strip() else {}
    except ValueError:
        row = {}
    if isinstance(row, dict) and row and cfg.image_column not in row:
        raise ValueError(f"{cfg.path}: no column {cfg.image_column!r} (input.image_column) in the first row; "
                         f"columns: {sorted(row)}")
    if isinstance(row, dict) and row:
        manifest_record(cfg, {**row, cfg.image_column: row[cfg.image_column] or "x"}, f"{cfg.path}#byte0")
    for start in range(0, size, cfg.manifest_chunk_bytes):
        yield {"kind": "jsonl", "root": root, "key": key, "start": start,
               "end": min(size, start + cfg.manifest_chunk_bytes)}


def _jsonl_lines(st: Storage, key: str, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of every line that STARTS in ``[start, end)``; the last one may run past
    ``end`` (read on in 64 KiB steps). A line starting exactly at ``start`` belongs to this range."""
    size = st.size(key)
    a = max(0, start - 1)
    buf = st.get_range(key, a, min(size, end + (1 << 16)) - a)
    pos = a
    if start > 0:  # skip the tail of the line owned by the previous range
        nl = buf.find(b"\n")
        while nl < 0 and pos + len(buf) < size:
            buf += st.get_range(key, pos + len(buf), min(1 << 16, size - pos - len(buf)))
            nl = buf.find(b"\n")
        if nl < 0:
            return
        pos, buf = pos + nl + 1, buf[nl + 1:]
    while pos < end:
        nl = buf.find(b"\n")
        while nl < 0 and pos + len(buf) < size:
            buf += st.get_range(key, pos + len(buf), min(1 << 16, size - pos - len(buf)))
            nl = buf.find(b"\n")
        line = buf if nl < 0 else buf[:nl]
        yield pos, line
        if nl < 0:
            return
        pos, buf = pos + nl + 1, buf[nl + 1:]


def manifest_record(cfg: InputConfig, row: Any, row_id: str) -> dict[str, Any]:
    """One manifest row -> a record; raises :class:`Reject` (image_missing / invalid_row)."""
    if not isinstance(row, dict):
        raise Reject("invalid_row", "each line must be a JSON object")
    image = row.get(cfg.image_column)
    if not image:
        raise Reject("image_missing")
    sid = str(row.get(cfg.id_column)) if cfg.id_column and row.get(cfg.id_column) is not None else str(image)
    image = str(image)
    if image.startswith(("http://", "https://")):
        raise ValueError(f"{row_id}: column {cfg.image_column!r} (input.image_column) is an http(s) URL "
                         f"({image[:80]}); web URLs are not fetched: download the images first (e.g. with "
                         "img2dataset) and list their local paths or s3:// URLs")
    base = cfg.path.rsplit("/", 1)[0] if "/" in cfg.path else "."
    if not image.startswith("s3://") and not image.startswith("/"):
        image = f"{base}/{image}" if base.startswith("s3://") else str(Path(base) / image)
    root, key = _split_url(image)
    extra = {k: v for k, v in row.items() if k not in (cfg.image_column, cfg.caption_column, cfg.id_column)}
    caption = row.get(cfg.caption_column)
    return {"source_id": sid, "img": {"root": root, "key": key}, "cap": None,
            "caption": caption if caption is None else str(caption),
            "extra": json.loads(json.dumps(extra, default=str)) or None}


def manifest_events(cfg: InputConfig, unit: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``("record", rec)`` / ``("reject", row)`` for the rows of one manifest unit."""
    st = storage_for(unit["root"])
    if unit["kind"] == "parquet":
        import pyarrow.parquet as pq

        with RangeFile(st, unit["key"]) as f:
            rows = pq.ParquetFile(f).read_row_group(unit["group"]).to_pylist()
        items = ((f"{cfg.path}#row{unit['row0'] + i}", r, None) for i, r in enumerate(rows))
    else:
        def parse():
            for off, line in _jsonl_lines(st, unit["key"], unit["start"], unit["end"]):
                if not line.strip():
                    continue
                try:
                    yield f"{cfg.path}#byte{off}", json.loads(line), None
                except ValueError as e:
                    yield f"{cfg.path}#byte{off}", None, f"invalid JSON: {e}"[:160]
        items = parse()
    for row_id, row, err in items:
        if err:
            yield "reject", {"source_id": row_id, "reason": "invalid_row", "detail": err}
            continue
        try:
            yield "record", manifest_record(cfg, row, row_id)
        except Reject as r:
            yield "reject", {"source_id": row_id, "reason": r.reason, **({"detail": r.detail} if r.detail else {})}


def _tar_list(path: str) -> Iterator[tuple[str, str]]:
    """(storage root, key) of every input tar: a brace pattern, one .tar, or a dir/prefix of tars
    (listed page by page)."""
    import braceexpand

    if path.endswith(".tar") or "{" in path:
        for p in braceexpand.braceexpand(path):
            yield posixpath.split(p) if p.startswith("s3://") else (str(Path(p).parent), Path(p).name)
        return
    st = _input_root(path)
    n = 0
    for k in st.iter_list():
        if k.endswith(".tar"):
            n += 1
            yield st.root, k
    if not n:
        raise ValueError(f"input.path: no .tar files under {path}")


def _unsafe(name: str, ti: tarfile.TarInfo) -> str | None:
    """Why a tar member must not be used (never extracted either way)."""
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in PurePosixPath(name).parts:
        return "path traversal"
    if not ti.isfile():
        return "not a regular file"
    return None


def scan_tar(root: str, key: str):
    """Yield ``("record", rec)`` / ``("reject", row)`` for each sample of an input tar (streaming)."""
    st = storage_for(root)
    groups: dict[str, dict[str, Any]] = {}
    order: list[str] = []

    def flush():
        for k in order:
            g = groups[k]
            sid = f"{key}/{k}"
            img_ext = next((e for e in TAR_IMAGE_EXTS if e in g["data"]), None)
            if img_ext is None:
                yield "reject", {"source_id": sid, "reason": "image_missing"}
                continue
            extra = None
            if "json" in g["data"]:
                try:
                    extra = json.loads(g["data"]["json"])
                except ValueError:
                    extra = None
            yield "record", {"source_id": sid,
                             "img": {"root": root, "key": key, "range": g["members"][img_ext]},
                             "img_bytes": g["data"][img_ext], "cap": None,
                             "caption": g["data"].get("txt"), "extra": extra}
        groups.clear()
        order.clear()

    try:
        total = st.size(key)
        with st.open_read(key) as f, tarfile.open(fileobj=f, mode="r|") as tf:
            for ti in tf:
                name = ti.name
                why = _unsafe(name, ti)
                if why:
                    yield "reject", {"source_id": f"{key}/{name}", "reason": "unsafe_member", "detail": why}
                    continue
                d, base = posixpath.split(name)
                if "." not in base:
                    continue
                skey, ext = base.split(".", 1)
                skey = f"{d}/{skey}" if d else skey
                if order and skey != order[-1]:
                    yield from flush()
                if skey not in groups:
                    groups[skey] = {"members": {}, "data": {}}
                    order.append(skey)
                ext = ext.lower()
                groups[skey]["members"][ext] = [ti.offset_data, ti.size]
                if ext in ("txt", "json", *TAR_IMAGE_EXTS):  # read into memory; never extracted
                    fobj = tf.extractfile(ti)
                    try:
                        data = fobj.read() if fobj else b""
                    except (tarfile.TarError, EOFError, OSError):
                        data = b""
                    if len(data) != ti.size:  # cut inside a member (short reads can be silent)
                        del groups[skey]
                        order.remove(skey)
                        yield "reject", {"source_id": f"{key}/{skey}", "reason": "truncated",
                                         "detail": f"member {name}: {len(data)} of {ti.size} bytes"}
                        raise tarfile.ReadError(f"unexpected end of data in member {name}")
                    groups[skey]["data"][ext] = data
            yield from flush()
            # tarfile ends silently at a cut header; a complete tar has a 2-block end marker
            if total - tf.offset < 2 * tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"no end-of-archive marker after byte {tf.offset} (truncated tar?)")
    except (tarfile.TarError, EOFError, OSError, StorageError) as e:
        yield from flush()
        yield "reject", {"source_id": key, "reason": "corrupt_tar", "detail": f"{type(e).__name__}: {e}"[:160]}
