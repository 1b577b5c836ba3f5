"""What every backend implements, and the launch pieces they share.

A backend turns a :class:`~cluster.spec.JobSpec` into the exact thing it submits (``render``:
an sbatch script, a Ray Jobs request, Kubernetes manifests, a local launch plan), submits it,
finds an earlier submission of the same job id on the backend itself (idempotency after a crash
between submit and the registry write), and reports status, logs and cancels.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.errors import ClusterError, ToolNotFoundError, tool_hint
from cluster.registry import JobRecord
from cluster.spec import JobSpec

# Normalised states shown by `sar-scale jobs status`.
STATES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "UNKNOWN")
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


@dataclass
class JobStatus:
    state: str
    detail: str = ""
    exit_code: int | None = None
    backend_state: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "detail": self.detail, "exit_code": self.exit_code,
                "backend_state": self.backend_state}


class Backend(ABC):
    name: str = ""

    def check(self, spec: JobSpec, environ: dict[str, str]) -> None:
        """Pre-submit checks (tools present, secrets set). Raise with what to do."""
        missing = spec.missing_secrets(environ)
        if missing:
            raise ClusterError(f"secret variable(s) {', '.join(missing)} named in the cluster profile "
                               f"({spec.profile.name}) are not set in this environment: export them before "
                               f"submitting (values are passed to the job, never written to files)")

    @abstractmethod
    def render(self, spec: JobSpec, job_dir: Path, after: list[str] | None = None) -> str:
        """Exactly what would be submitted (the --dry-run text). Writes nothing."""

    @abstractmethod
    def submit(self, spec: JobSpec, job_dir: Path, after: list[str] | None = None) -> tuple[str, dict]:
        """Submit; returns (backend id, backend-specific info for the registry)."""

    def find(self, spec: JobSpec, job_dir: Path) -> tuple[str, dict] | None:
        """An earlier submission of ``spec.job_id`` on the backend itself, if any."""
        return None

    @abstractmethod
    def status(self, record: JobRecord) -> JobStatus: ...

    @abstractmethod
    def logs(self, record: JobRecord, tail: int | None = None) -> str: ...

    @abstractmethod
    def cancel(self, record: JobRecord) -> None: ...


def require_tool(tool: str) -> str:
    """Absolute path of ``tool`` or a :class:`ToolNotFoundError` saying what to install."""
    path = shutil.which(tool)
    if path is None:
        raise ToolNotFoundError(f"`{tool}` not found on PATH: {tool_hint(tool)}")
    return path


def run_tool(argv: list[str], input: str | None = None, timeout: float = 60.0,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run a backend CLI (sbatch, squeue, kubectl) with a clear error if it is missing or fails."""
    exe = require_tool(argv[0])
    try:
        proc = subprocess.run([exe, *argv[1:]], input=input, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"`{shlex.join(argv)}` did not answer in {timeout:.0f}s") from None
    if check and proc.returncode != 0:
        raise ClusterError(f"`{shlex.join(argv)}` failed (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def sar_argv(spec: JobSpec) -> list[str]:
    """``python -m sar_scale.cli <command...>`` (``-m`` so the job's working dir is on sys.path)."""
    return [spec.python, "-m", "sar_scale.cli", *spec.command]


def torchrun_argv(spec: JobSpec, nnodes: str, endpoint: str, rdzv_id: str,
                  node_rank: str | None = None) -> list[str]:
    """A torchrun agent: c10d rendezvous at ``endpoint`` (host:port) shared by every node."""
    argv = [spec.python, "-m", "torch.distributed.run", f"--nnodes={nnodes}"]
    if node_rank is not None:
        argv.append(f"--node_rank={node_rank}")
    argv += [f"--nproc_per_node={spec.nproc_per_node}", "--rdzv_backend=c10d",
             f"--rdzv_endpoint={endpoint}", f"--rdzv_id={rdzv_id}",
             "-m", "sar_scale.cli", *spec.command]
    return argv


def tail_text(text: str, tail: int | None) -> str:
    if tail is None or tail <= 0:
        return text
    lines = text.splitlines(keepends=True)
    return "".join(lines[-tail:])


def read_log(path: Path, tail: int | None = None) -> str:
    if not path.exists():
        raise ClusterError(f"log file {path} does not exist (yet): the job may not have started")
    return tail_text(path.read_text(errors="replace"), tail)
