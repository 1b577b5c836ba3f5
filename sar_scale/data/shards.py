"""Commit one shard of format v2 (docs/shard-format.md): the one writer every producer calls.

Order is the protocol (img2dataset-style): the tar, then ``index.npy``, then ``hashes.npy``, and
``stats.json`` LAST - a shard exists for readers only once its stats are there, so a writer killed
at any point leaves nothing a reader would use, and rerunning the same shard rewrites the same bytes.

The tar is spooled to a local temp file (webdataset's ``TarWriter``, fixed mtime/owner so reruns are
byte-identical) and uploaded with :meth:`Storage.put_file`: an atomic rename locally, boto3's transfer
manager on S3 (multipart above the storage's threshold; an object appears only when
CompleteMultipartUpload succeeds, and a failed upload is aborted, see ``S3Storage.put_file``).
Byte ranges for ``index.npy`` are taken from the tar stream's offset while writing, so the finished
tar is never re-read.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from sar_scale.data import schema
from sar_scale.data.storage import Storage

_KEY_RE = re.compile(rf"^[A-Za-z0-9_-]{{1,{schema.KEY_LEN}}}$")


def _sample_grids(sample: dict[str, Any]) -> dict[str, list[int]]:
    try:
        meta = json.loads(sample[schema.JSON])
        return schema.normalize_grids(meta["buckets"], "sample json 'buckets'")
    except (KeyError, TypeError, ValueError) as e:
        raise schema.SchemaError(f"sample {sample.get('__key__')!r}: json member without valid 'buckets' "
                                 f"(build samples with schema.make_sample): {e}") from None


def hashes_array(rows: Iterable[tuple[str, bytes | str, int]]) -> np.ndarray:
    """``[(key, sha, phash), ...]`` -> :data:`schema.HASHES_DTYPE` array; ``sha`` as bytes or hex
    (the first 16 bytes are kept)."""
    out = []
    for key, sha, phash in rows:
        if isinstance(sha, str):
            sha = bytes.fromhex(sha)
        out.append((key.encode("ascii"), bytes(sha[:16]), int(phash) & 0xFFFFFFFFFFFFFFFF))
    return np.array(out, dtype=schema.HASHES_DTYPE)


def commit_shard(storage: Storage, name: str, index: int, samples: Iterable[dict[str, Any]],
                 grids: dict[Any, Any], *, hashes: np.ndarray | None = None,
                 rejects: dict[str, int] | None = None, run: str = "", extra: dict[str, Any] | None = None,
                 tmp_dir: str | Path | None = None) -> dict[str, Any]:
    """Write shard ``index`` of dataset ``name``: tar, ``index.npy``, ``hashes.npy`` (when ``hashes``
    is given), then ``stats.json`` last. Returns the stats (what :func:`schema.read_shard_stats` reads).

    ``samples``: :func:`schema.make_sample` dicts, consumed once (a generator is fine), in strictly
    increasing ``__key__`` order, all on the shard's token ``grids`` (``{res: (h, w)}``: one aspect
    bucket per shard). ``hashes``: :data:`schema.HASHES_DTYPE` rows in the same order (see
    :func:`hashes_array`). ``rejects``: ``{reason: count}`` of inputs assigned here but dropped by
    the writer's stages. ``extra``: additional stats fields (e.g. the pipeline's plan hash).
    A :class:`schema.SchemaError` is raised before anything is uploaded when samples break the rules.
    """
    want = schema.normalize_grids(grids)
    stem = schema.shard_stem(name, index)
    rows: list[tuple[bytes, int, int]] = []
    fd, local = tempfile.mkstemp(prefix=f"{stem}-", suffix=".tar", dir=tmp_dir)
    os.close(fd)
    try:
        with wds.TarWriter(local, encoder=False, mtime=0, user="sar", group="sar") as tw:
            prev = None
            for s in samples:
                key = s.get("__key__")
                if not isinstance(key, str) or not _KEY_RE.match(key):
                    raise schema.SchemaError(f"{stem}: bad sample key {key!r} (use schema.sample_key)")
                if prev is not None and key <= prev:
                    raise schema.SchemaError(f"{stem}: sample keys must be strictly increasing "
                                             f"({key!r} after {prev!r})")
                got = _sample_grids(s)
                if got != want:
                    raise schema.SchemaError(f"{stem}: sample {key} has grids {got}, the shard's are {want} "
                                             "(one aspect bucket per shard)")
                start = tw.tarstream.offset
                tw.write(s)
                rows.append((key.encode("ascii"), start, tw.tarstream.offset))
                prev = key
        nbytes = os.path.getsize(local)
        index_arr = np.array(rows, dtype=schema.INDEX_DTYPE)
        if hashes is not None:
            hashes = np.asarray(hashes)
            if hashes.dtype != schema.HASHES_DTYPE or hashes.shape != (len(rows),):
                raise schema.SchemaError(f"{stem}: hashes must be {len(rows)} rows of {schema.HASHES_DTYPE.descr}")
            if not np.array_equal(hashes["key"], index_arr["key"]):
                raise schema.SchemaError(f"{stem}: hashes keys differ from the samples' keys (same order)")
        index_bytes = schema.encode_npy(index_arr)
        stats = schema.make_shard_stats(name, index, len(rows), nbytes, want, len(index_bytes),
                                        rejects=rejects, hashes=hashes is not None, run=run, extra=extra)
        schema.validate_index(index_arr, stats, schema.index_name(name, index))
        # an old commit of this index (an earlier run's plan) must not pair with the new tar
        storage.delete(schema.stats_name(name, index))
        storage.put_file(local, schema.tar_name(name, index))
    finally:
        Path(local).unlink(missing_ok=True)
    storage.put_bytes(index_bytes, schema.index_name(name, index))
    if hashes is not None:
        storage.put_bytes(schema.encode_npy(hashes), schema.hashes_name(name, index))
    storage.put_bytes(json.dumps(stats, sort_keys=True).encode("utf-8"), schema.stats_name(name, index))
    return stats


def uncommit_shard(storage: Storage, name: str, index: int) -> None:
    """Delete shard ``index``: stats first (so a crash in between leaves nothing committed), then the rest."""
    storage.delete(schema.stats_name(name, index))
    for key in (schema.tar_name(name, index), schema.index_name(name, index), schema.hashes_name(name, index)):
        storage.delete(key)
