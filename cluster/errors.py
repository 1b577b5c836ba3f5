"""Errors raised by job submission, each one saying what to install, start or set."""

from __future__ import annotations


class ClusterError(RuntimeError):
    """Base class: a submission, query or cancel failed; the message says what to do next."""


class ToolNotFoundError(ClusterError):
    """A backend's command-line tool (sbatch, kubectl, ...) is not on PATH."""


class BackendUnreachableError(ClusterError):
    """The backend's endpoint (Ray dashboard, Kubernetes API, slurmctld) did not answer."""


class SubmitError(ClusterError):
    """The backend refused the submission (its own message is included)."""


class JobConflictError(ClusterError):
    """A job id was reused for a different submission (ids are idempotency keys)."""


class JobNotFoundError(ClusterError):
    """No job with this id in the registry."""


# One message per tool: what to install, or which backend to use instead.
INSTALL_HINTS: dict[str, str] = {
    "sbatch": "install the Slurm client tools (Debian/Ubuntu: `apt-get install slurm-client`, or "
              "`slurm-wlm` for a whole single-host cluster; `bash scripts/setup_system.sh` does it) and "
              "point SLURM_CONF at your cluster's slurm.conf, or submit with --backend local|ray|k8s",
    "kubectl": "install kubectl and point KUBECONFIG (or k8s.context in the profile) at your cluster, "
               "or use --dry-run to print the manifest and apply it elsewhere",
}


def tool_hint(tool: str) -> str:
    """The install hint for ``tool`` (all Slurm tools share sbatch's)."""
    if tool in ("squeue", "sacct", "scancel", "scontrol", "sbatch", "srun"):
        return INSTALL_HINTS["sbatch"]
    return INSTALL_HINTS.get(tool, f"install {tool} or choose another --backend")
