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
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Any

from pipelines.config import InputConfig
from pipelines.validate import Reject
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


def _chunks(records: list[dict[str, Any]], n: int) -> list[list[dict[str, Any]]]:
    return [records[i: i + n] for i in range(0, len(records), n)]


def enumerate_inputs(cfg: InputConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(scan units, early rejects). Units are deterministic for the same inputs."""
    if cfg.kind == "folder":
        records, rejects = _folder_records(cfg)
        return [{"kind": "records", "records": c} for c in _chunks(records, cfg.files_per_unit)], rejects
    if cfg.kind == "imagefolder":
        records, rejects = _imagefolder_records(cfg)
        return [{"kind": "records", "records": c} for c in _chunks(records, cfg.files_per_unit)], rejects
    if cfg.kind == "manifest":
        records, rejects = _manifest_records(cfg)
        return [{"kind": "records", "records": c} for c in _chunks(records, cfg.files_per_unit)], rejects
    return [{"kind": "tar", "root": root, "key": key} for root, key in _tar_list(cfg.path)], []


def _folder_records(cfg: InputConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    st = _input_root(cfg.path)
    by_stem: dict[str, list[str]] = defaultdict(list)
    for key in st.list():
        stem, ext = posixpath.splitext(key)
        by_stem[stem].append(ext)
    records, rejects = [], []
    ignored = 0
    for stem in sorted(by_stem):
        exts = by_stem[stem]
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
            continue
        for e in images:
            records.append({"source_id": stem + e, "img": {"root": st.root, "key": stem + e},
                            "cap": {"root": st.root, "key": stem + cap_ext} if cap_ext else None,
                            "caption": None, "extra": None})
    if ignored:
        logger.info("input folder: ignored %d files that are neither images nor captions", ignored)
    return records, rejects


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
    """Class name -> id of an imagefolder input: the mapping file, else the sorted class folder names."""
    if cfg.class_map:
        return _read_class_map(cfg.class_map)
    names = sorted({k.split("/", 1)[0] for k in _input_root(cfg.path).list() if "/" in k
                    and posixpath.splitext(k)[1].lower() in IMAGE_EXTS})
    if not names:
        raise ValueError(f"input.path: no class folders with images under {cfg.path} "
                         "(imagefolder expects root/<class_name>/<image>)")
    return {n: i for i, n in enumerate(names)}


def _imagefolder_records(cfg: InputConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``root/<class>/<image>``: caption = class name, ``extra.class_id``; optional flip copies."""
    st = _input_root(cfg.path)
    classes = class_index(cfg)
    records, rejects = [], []
    for key in sorted(st.list()):
        ext = posixpath.splitext(key)[1].lower()
        if ext in (CAPTION_EXT, ".json") or posixpath.basename(key).startswith("."):
            continue  # side files (labels, READMEs) are not samples
        if ext not in IMAGE_EXTS:
            rejects.append({"source_id": key, "reason": "unsupported_format", "detail": f"extension {ext or '(none)'}"})
            continue
        if "/" not in key:
            rejects.append({"source_id": key, "reason": "class_missing",
                            "detail": "image at the root; imagefolder expects root/<class_name>/<image>"})
            continue
        name = key.split("/", 1)[0]
        if name not in classes:
            rejects.append({"source_id": key, "reason": "unknown_class", "detail": f"{name!r} is not in input.class_map"})
            continue
        extra = {"class_id": classes[name], "class_name": name}
        ref = {"root": st.root, "key": key}
        records.append({"source_id": key, "img": ref, "cap": None, "caption": name, "extra": extra})
        if cfg.flip:
            records.append({"source_id": key + "#flip", "img": {**ref, "flip": True}, "cap": None, "caption": name,
                            "extra": {**extra, "flip": True}})
    return records, rejects


def _read_manifest_rows(path: str) -> list[dict[str, Any]]:
    root, key = _split_url(path)
    try:
        data = storage_for(root).get_bytes(key)
    except StorageNotFound:
        raise ValueError(f"input.path: manifest not found: {path}") from None
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    rows = []
    for i, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: invalid JSON line ({e})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: each line must be a JSON object")
        rows.append(row)
    return rows


def _manifest_records(cfg: InputConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows = _read_manifest_rows(cfg.path)
    if rows and cfg.image_column not in rows[0] and all(cfg.image_column not in r for r in rows):
        raise ValueError(f"{cfg.path}: no column {cfg.image_column!r} (input.image_column); "
                         f"columns: {sorted(rows[0])}")
    base = cfg.path.rsplit("/", 1)[0] if "/" in cfg.path else "."
    records, rejects = [], []
    for i, row in enumerate(rows):
        image = row.get(cfg.image_column)
        sid = str(row.get(cfg.id_column)) if cfg.id_column and row.get(cfg.id_column) is not None else image
        if not image:
            rejects.append({"source_id": f"{cfg.path}#row{i}", "reason": "image_missing"})
            continue
        image = str(image)
        if image.startswith(("http://", "https://")):
            raise ValueError(f"{cfg.path}: row {i} column {cfg.image_column!r} (input.image_column) is an "
                             f"http(s) URL ({image[:80]}); web URLs are not fetched: download the images first "
                             "(e.g. with img2dataset) and list their local paths or s3:// URLs")
        if not image.startswith("s3://") and not image.startswith("/"):
            image = f"{base}/{image}" if base.startswith("s3://") else str(Path(base) / image)
        root, key = _split_url(image)
        extra = {k: v for k, v in row.items() if k not in (cfg.image_column, cfg.caption_column, cfg.id_column)}
        caption = row.get(cfg.caption_column)
        records.append({"source_id": str(sid), "img": {"root": root, "key": key}, "cap": None,
                        "caption": caption if caption is None else str(caption),
                        "extra": json.loads(json.dumps(extra, default=str)) or None})
    return records, rejects


def _tar_list(path: str) -> list[tuple[str, str]]:
    """(storage root, key) of every input tar: a brace pattern, one .tar, or a dir/prefix of tars."""
    import braceexpand

    if path.endswith(".tar") or "{" in path:
        out = []
        for p in braceexpand.braceexpand(path):
            root, key = posixpath.split(p) if p.startswith("s3://") else (str(Path(p).parent), Path(p).name)
            out.append((root, key))
        return out
    st = _input_root(path)
    tars = [(st.root, k) for k in st.list() if k.endswith(".tar")]
    if not tars:
        raise ValueError(f"input.path: no .tar files under {path}")
    return tars


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
