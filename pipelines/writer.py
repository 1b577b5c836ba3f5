"""Write one shard: webdataset tar (uploaded atomically) then its stats.json (the commit marker)."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from sar_scale.data import schema
from sar_scale.data.storage import Storage


def plan_hash(source_ids: list[str]) -> str:
    """Fingerprint of a shard's assignment: a committed shard is reused only if it still matches."""
    h = hashlib.sha256()
    for s in source_ids:
        h.update(s.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


def row_to_sample(row: dict[str, Any], resolutions: list[int]) -> dict[str, Any]:
    tokens = {r: np.frombuffer(row[f"tok_{r}"], np.int32).reshape(int(row[f"gh_{r}"]), int(row[f"gw_{r}"]))
              for r in resolutions}
    text = None
    if int(row.get("text_len", 0)):
        text = np.frombuffer(row["text"], np.float16).reshape(int(row["text_len"]), int(row["text_dim"]))
    extra = json.loads(row["extra"]) if row.get("extra") else None
    return schema.make_sample(str(row["source_id"]), str(row["caption"]), tokens,
                              (int(row["orig_w"]), int(row["orig_h"])),
                              scores=json.loads(row.get("scores") or "{}"), text_features=text,
                              thumbnail_jpg=row["thumb"] or None, extra=extra)


def write_shard(storage: Storage, name: str, index: int, rows: list[dict[str, Any]],
                resolutions: list[int], tmp_dir: str | Path, extra_stats: dict[str, Any]) -> dict[str, Any]:
    """Tar first (atomic put), stats last. Rows are written in plan order (``pos``), so a rerun
    produces a byte-identical tar (fixed mtime, fixed owner)."""
    rows = sorted(rows, key=lambda r: int(r["pos"]))
    good = [r for r in rows if not r["reject"]]
    rejected = [{"source_id": str(r["source_id"]), "reason": str(r["reject"]), "detail": str(r["detail"])}
                for r in rows if r["reject"]]
    local = Path(tmp_dir) / schema.tar_name(name, index)
    try:
        with wds.TarWriter(str(local), mtime=0) as tw:
            for r in good:
                tw.write(row_to_sample(r, resolutions))
        index_rows = schema.build_index(local)
        nbytes = local.stat().st_size
        storage.put_file(local, schema.tar_name(name, index))
    finally:
        if local.exists():
            os.unlink(local)
    stats = schema.make_stats(name, index, len(good), Counter(r["reason"] for r in rejected), nbytes,
                              index_rows, extra={**extra_stats, "reject_ids": rejected})
    schema.write_stats(storage, name, index, stats)
    return stats
