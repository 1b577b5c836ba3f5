"""Atomic file writes: readers see the old file or the new one, never a half-written one.

Write to a temporary name beside the target (same directory, so the rename cannot cross file
systems), fsync it, then ``os.replace`` it over the target; on failure the temporary is removed.
Temporary names carry :data:`TMP_MARK`, which storage listings hide and cleanup removes.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, fsync: bool = True, sync_dir: bool = False) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to (with any library's writer: safetensors,
    ``open``, json); it replaces ``path`` when the block exits cleanly and is removed if it raises.
    ``fsync``: the data is on disk before the rename; ``sync_dir``: the rename itself is too (for
    markers others trust, like a checkpoint's commit record)."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if fsync and tmp.is_file():
            _fsync(tmp)
        os.replace(tmp, dest)
        if sync_dir:
            _fsync(dest.parent)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes | str, fsync: bool = True, sync_dir: bool = False) -> Path:
    """Write ``data`` (text is UTF-8) to ``path`` atomically."""
    with atomic_path(path, fsync, sync_dir) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, fsync: bool = True, **dumps_kw: Any) -> Path:
    return atomic_write(path, json.dumps(obj, **({"indent": 2} | dumps_kw)) + "\n", fsync)


__all__ = ["TMP_MARK", "atomic_path", "atomic_write", "atomic_write_json"]
