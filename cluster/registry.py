"""The local job registry: one folder per submitted job id under ``~/.sar-scale/jobs``.

It is what makes job ids idempotency keys on this side (the backends are asked too, see
:mod:`cluster.submit`) and what ``sar-scale jobs`` reads: which backend holds the job, under
which backend id, where its logs are. Records are JSON written atomically (temp file + rename),
and a per-id ``flock`` serialises two concurrent submissions of the same id.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from sar_scale.config import StrictModel
from sar_scale.utils.atomic import atomic_write

ENV_VAR = "SAR_SCALE_JOBS_DIR"


def default_root() -> Path:
    """``$SAR_SCALE_JOBS_DIR`` or ``~/.sar-scale/jobs``."""
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".sar-scale" / "jobs")


class JobRecord(StrictModel):
    """What the registry knows about one submission (never any secret value)."""

    job_id: str
    kind: Literal["job", "chain"] = "job"
    backend: str
    backend_id: str | None = Field(None, description="Slurm job id, Ray submission id, k8s name, local pid")
    submitted_at: float = Field(default_factory=time.time)
    fingerprint: str
    command: list[str] = Field(default_factory=list)
    spec: dict[str, Any] = Field(default_factory=dict)
    log_path: str | None = None
    members: list[str] = Field(default_factory=list, description="chain: member job ids, in order")
    info: dict[str, Any] = Field(default_factory=dict, description="backend-specific handles")


class JobRegistry:
    """Folder-per-job store with atomic writes and per-id locks."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    @contextlib.contextmanager
    def lock(self, job_id: str) -> Iterator[None]:
        """Exclusive lock on one job id (other processes submitting the same id wait here)."""
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{job_id}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def get(self, job_id: str) -> JobRecord | None:
        path = self.job_dir(job_id) / "record.json"
        if not path.exists():
            return None
        return JobRecord.model_validate_json(path.read_text())

    def put(self, record: JobRecord) -> Path:
        d = self.job_dir(record.job_id)
        d.mkdir(parents=True, exist_ok=True)
        return atomic_write(d / "record.json", record.model_dump_json(indent=2))

    def list(self) -> list[JobRecord]:
        if not self.root.exists():
            return []
        out = []
        for p in sorted(self.root.glob("*/record.json")):
            try:
                out.append(JobRecord.model_validate_json(p.read_text()))
            except ValueError:
                continue  # a foreign or damaged file is not a job of ours
        return sorted(out, key=lambda r: r.submitted_at)
