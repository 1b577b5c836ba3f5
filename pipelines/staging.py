"""Staging files of one `data prepare` run under ``{output}/_staging/``: the shuffles between stages.

Every stage is a set of Ray tasks that read their input partition's files and write files for the next
stage's partitions (Parquet, one file per (producer, partition); empty ones are not written). Names are
a function of the plan only, so a retried task overwrites its own files with the same rows: exactly
once without coordination. The driver only sees per-task counts. The prefix is deleted when the run
ends (and at the start of the next run, which also redoes whatever a killed run left half done).

Partitioning:
- by *key range* (:func:`key_part`): sample keys are sha256 hex, so the first 8 hex digits map them
  uniformly onto ``P`` contiguous ranges - partition order is key order, which the shard plan uses;
- by *hash* of any string (:func:`hash_part`) for the exact-duplicate and LSH-band groupings.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterable
from typing import Any

from sar_scale.data.storage import Storage

STAGING = "_staging"


def key_part(key: str, parts: int) -> int:
    """Range partition of a sha256-hex sample key: monotone in the key."""
    return (int(key[:8], 16) * parts) >> 32


def hash_part(value: str, parts: int) -> int:
    return int.from_bytes(hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest(), "big") % parts


def to_signed64(v: int) -> int:
    """uint64 pHash -> int64 for Parquet (and back with :func:`to_unsigned64`)."""
    return v - (1 << 64) if v >= 1 << 63 else v


def to_unsigned64(v: int) -> int:
    return v + (1 << 64) if v < 0 else v


class Staging:
    """Read/write the staging files of one run (picklable: tasks receive it)."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def key(self, *parts: str) -> str:
        return "/".join((STAGING, *parts))

    def clear(self) -> int:
        return self.storage.delete_prefix(STAGING + "/")

    # -- tables
    def put_rows(self, key: str, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf, compression="zstd")
        self.storage.put_bytes(buf.getvalue(), key)

    def get_rows(self, key: str) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(self.storage.get_bytes(key))).to_pylist()

    def write_parts(self, stage: str, producer: str, rows: Iterable[dict[str, Any]],
                    part_of: Callable[[dict[str, Any]], int]) -> dict[int, int]:
        """Split ``rows`` by partition into ``{stage}/p{p}/{producer}.parquet``; returns rows per partition."""
        by: dict[int, list[dict[str, Any]]] = {}
        for r in rows:
            by.setdefault(part_of(r), []).append(r)
        for p, rs in by.items():
            self.put_rows(self.key(stage, f"p{p:05d}", f"{producer}.parquet"), rs)
        return {p: len(rs) for p, rs in by.items()}

    def read_part(self, stage: str, p: int) -> list[dict[str, Any]]:
        """Every row written for partition ``p`` of ``stage``, in producer-name order."""
        rows: list[dict[str, Any]] = []
        for k in self.storage.iter_list(self.key(stage, f"p{p:05d}") + "/"):
            rows += self.get_rows(k)
        return rows

    # -- rejects (JSON lines, sorted inside each file; files concatenated in name order)
    def put_rejects(self, name: str, rejects: list[dict[str, Any]]) -> None:
        if rejects:
            rows = sorted(rejects, key=lambda r: (str(r["source_id"]), str(r["reason"])))
            self.storage.put_bytes("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode(),
                                   self.key("rejects", name))

    def reject_files(self) -> Iterable[str]:
        return self.storage.iter_list(self.key("rejects") + "/")
