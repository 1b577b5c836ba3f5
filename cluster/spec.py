"""Typed job descriptions: a cluster profile (where and how to run) and a JobSpec (what to run).

A profile is a YAML file in ``configs/cluster/`` loaded strictly (unknown keys are errors). It
holds plain environment variables, but secrets only by *name* (``secret_env``): their values stay
in the submitting environment and reach the job through the backend's own channel (inherited
environment, ``sbatch --export=ALL``, Ray's runtime env at submit time, Kubernetes Secrets), so no
rendered script, manifest, registry record or dry-run ever contains them.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from sar_scale.config import ConfigError, StrictModel, load_config
from sar_scale.utils.redact import is_secret_key

BACKENDS = ("local", "slurm", "ray", "k8s")
JOB_ID_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Slurm --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_to_seconds(value: str) -> int:
    """Slurm ``--time`` string -> seconds (used for Kubernetes ``activeDeadlineSeconds``)."""
    m = _TIME_RE.match(value.strip())
    if not m:
        raise ValueError(f"time {value!r} is not a Slurm time (MM, HH:MM:SS, D-HH, D-HH:MM:SS)")
    days, a, b, c = m.groups()
    if days is not None:  # D-H[:M[:S]]
        return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if c is not None:  # H:M:S
        return int(a) * 3600 + int(b) * 60 + int(c)
    if b is not None:  # M:S
        return int(a) * 60 + int(b)
    return int(a) * 60  # M


class Mount(StrictModel):
    """A host path (shared filesystem, dataset cache) mounted into the job's container."""

    source: str = Field(..., min_length=1, description="path on the node (or PVC name on k8s, `pvc:NAME`)")
    target: str = Field(..., min_length=1, description="path inside the container")
    readonly: bool = False


class ContainerSection(StrictModel):
    image: str | None = Field(None, description="container image; none = run on the node's own environment")
    runtime: Literal["pyxis", "apptainer"] = Field(
        "pyxis", description="Slurm: `srun --container-image` (enroot/pyxis) or `apptainer exec`")


class Resources(StrictModel):
    """Default job size for this cluster; `sar-scale submit` flags override each field."""

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    procs_per_node: int | None = Field(None, ge=1, description="ranks per node (default gpus_per_node, at least 1)")
    cpus_per_task: int | None = Field(None, ge=1, description="CPUs for each node's task (all its ranks)")
    mem: str | None = Field(None, description="memory per node, Slurm syntax (e.g. 900G); k8s request")
    time: str | None = Field(None, description="wall-clock limit, Slurm syntax (D-HH:MM:SS)")

    @field_validator("time")
    @classmethod
    def _time(cls, v: str | None) -> str | None:
        if v is not None:
            time_to_seconds(v)
        return v


class SlurmSection(StrictModel):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = Field(None, description="node features, e.g. h100")
    exclusive: bool = Field(False, description="whole nodes (--exclusive)")
    log_dir: str | None = Field(None, description="where job output files go (shared FS); default: the "
                                "job's folder in the local registry")
    rdzv_port: int | None = Field(None, ge=1024, le=65535, description="torchrun c10d port on the head "
                                  "node; default 20000 + SLURM_JOB_ID % 20000 (distinct per job)")
    requeue: bool = Field(False, description="let Slurm requeue the job after a node failure/preemption "
                          "(training resumes with --resume auto)")
    extra_sbatch: list[str] = Field(default_factory=list, description="more #SBATCH options, e.g. --mail-type=END")
    srun_args: list[str] = Field(default_factory=list, description="extra srun options")
    setup: list[str] = Field(default_factory=list, description="shell lines run before srun (module load ...)")


class RaySection(StrictModel):
    address: str = Field("http://127.0.0.1:8265", description="Ray Jobs API (dashboard) address; "
                         "$RAY_ADDRESS or --ray-address override it")
    working_dir: str | None = Field(".", description="uploaded as the job's working_dir (code); None = "
                                    "the code is already on the cluster (set `workdir`)")
    excludes: list[str] = Field(default_factory=lambda: [".git", ".venv", "runs", "work_dirs", "*.pt",
                                                          "*.safetensors", "*.tar", "mlruns"])
    pip: list[str] = Field(default_factory=list, description="runtime_env pip packages")
    entrypoint_num_cpus: float | None = Field(None, ge=0)


class K8sSection(StrictModel):
    namespace: str = "default"
    context: str | None = Field(None, description="kubectl --context")
    kubectl: str = "kubectl"
    training_kind: Literal["PyTorchJob", "IndexedJob"] = Field(
        "PyTorchJob", description="Kubeflow PyTorchJob (training operator) or a plain indexed batch/v1 Job "
        "with a headless Service for the rendezvous")
    secret_name: str = Field("sar-scale-secrets", description="k8s Secret whose keys are the secret_env names")
    service_account: str | None = None
    image_pull_secrets: list[str] = Field(default_factory=list)
    ray_version: str = "2.60.0"
    shm_size: str = Field("64Gi", description="/dev/shm size (DataLoader workers, NCCL)")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    ttl_seconds_after_finished: int = Field(86400, ge=0)
    backoff_limit: int = Field(0, ge=0, description="pod restarts after a failure (training resumes with "
                               "--resume auto); 0 = fail the job at the first failure")
    rdzv_port: int = Field(29500, ge=1024, le=65535)


class ClusterProfile(StrictModel):
    """Where jobs run: scheduler settings, container, environment, mounts, storage and tracking."""

    name: str = "default"
    description: str = ""
    python: str | None = Field(None, description="interpreter on the cluster; default `python` (local: "
                               "this interpreter)")
    workdir: str | None = Field(None, description="code directory on the nodes (shared FS or inside the "
                                "image); default the submit directory (local/slurm)")
    env: dict[str, str] = Field(default_factory=dict, description="plain, non-secret environment variables")
    secret_env: list[str] = Field(default_factory=list, description="NAMES of secret variables taken from "
                                  "the submitting environment (values are never written anywhere)")
    mounts: list[Mount] = Field(default_factory=list)
    container: ContainerSection = Field(default_factory=ContainerSection)
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint -> AWS_ENDPOINT_URL")
    mlflow_tracking_uri: str | None = Field(None, description="-> MLFLOW_TRACKING_URI")
    resources: Resources = Field(default_factory=Resources)
    slurm: SlurmSection = Field(default_factory=SlurmSection)
    ray: RaySection = Field(default_factory=RaySection)
    k8s: K8sSection = Field(default_factory=K8sSection)

    @field_validator("env")
    @classmethod
    def _no_inline_secrets(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not ENV_NAME_RE.match(k):
                raise ValueError(f"env name {k!r} is not a valid environment variable name")
            if is_secret_key(k):  # credentials are never plain `env` values in a profile
                raise ValueError(f"env.{k} looks like a secret: list its NAME under secret_env and set "
                                 f"the value in the submitting environment (never inline secrets)")
        return v

    @field_validator("secret_env")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for k in v:
            if not ENV_NAME_RE.match(k):
                raise ValueError(f"secret_env entry {k!r} must be an environment variable NAME, not a value")
        return v

    def job_env(self) -> dict[str, str]:
        """Plain variables every job gets (profile env plus the S3/MLflow shortcuts)."""
        out = dict(self.env)
        if self.s3_endpoint:
            out.setdefault("AWS_ENDPOINT_URL", self.s3_endpoint)
        if self.mlflow_tracking_uri:
            out.setdefault("MLFLOW_TRACKING_URI", self.mlflow_tracking_uri)
        return out


def load_profile(path: str | Path | None) -> ClusterProfile:
    """Load a profile YAML strictly (``None`` = built-in defaults: this machine)."""
    if path is None:
        return ClusterProfile()
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"cluster profile not found: {p} (see configs/cluster/ for examples)")
    return load_config(ClusterProfile, p)


class JobSpec(StrictModel):
    """One submission: a sar-scale command, its size, and the profile it runs under."""

    job_id: str = Field(..., description="idempotency key: submitting the same id twice starts one job")
    backend: Literal["local", "slurm", "ray", "k8s"]
    command: list[str] = Field(..., min_length=1, description="sar-scale subcommand and its arguments")
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    procs_per_node: int | None = Field(None, ge=1)
    cpus_per_task: int | None = Field(None, ge=1)
    mem: str | None = None
    time: str | None = None
    launcher: Literal["auto", "torchrun", "plain"] = Field(
        "auto", description="torchrun (one agent per node, c10d rendezvous) or a plain process; auto = "
        "torchrun for `train`, plain otherwise")
    profile: ClusterProfile = Field(default_factory=ClusterProfile)

    @field_validator("job_id")
    @classmethod
    def _job_id(cls, v: str) -> str:
        if not JOB_ID_RE.match(v):
            raise ValueError(f"job id {v!r} must be 1-63 lowercase letters, digits or '-', starting and "
                             f"ending with a letter or digit (it names Slurm jobs, Ray submissions and "
                             f"Kubernetes objects)")
        return v

    @field_validator("time")
    @classmethod
    def _time(cls, v: str | None) -> str | None:
        if v is not None:
            time_to_seconds(v)
        return v

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str]) -> list[str]:
        from sar_scale.cli import COMMANDS

        if v[0] in ("submit", "jobs"):
            raise ValueError(f"command: `{v[0]}` cannot run inside a job")
        if v[0] not in COMMANDS:
            raise ValueError(f"command: {v[0]!r} is not a sar-scale command (known: {', '.join(COMMANDS)})")
        return v

    @model_validator(mode="after")
    def _shape(self) -> JobSpec:
        if self.nodes > 1 and not self.distributed and self.backend in ("local", "slurm"):
            raise ValueError(f"nodes={self.nodes} needs a distributed launcher: `{self.command[0]}` runs as "
                             f"one plain process (use --launcher torchrun, or the ray/k8s backends for multi-node data jobs)")
        return self

    @property
    def distributed(self) -> bool:
        """True when the command is launched through torchrun (one agent per node)."""
        if self.launcher == "auto":
            return self.command[0] == "train"
        return self.launcher == "torchrun"

    @property
    def nproc_per_node(self) -> int:
        return self.procs_per_node or max(1, self.gpus_per_node)

    @property
    def python(self) -> str:
        if self.profile.python:
            return self.profile.python
        if self.backend == "local":
            import sys

            return sys.executable
        return "python"

    def fingerprint(self) -> str:
        """Hash of everything that defines the submission: a reused job id must match it."""
        data = self.model_dump(mode="json")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def missing_secrets(self, environ: dict[str, str]) -> list[str]:
        return [k for k in self.profile.secret_env if not environ.get(k)]
