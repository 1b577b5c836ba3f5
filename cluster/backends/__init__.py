"""Job backends: local, slurm, ray, k8s (see :class:`cluster.backends.base.Backend`)."""

from __future__ import annotations

from cluster.backends.base import TERMINAL, Backend, JobStatus


def get_backend(name: str, ray_address: str | None = None) -> Backend:
    """The backend called ``name`` (imports are lazy: Ray is only loaded for the ray backend)."""
    if name == "local":
        from cluster.backends.local import LocalBackend

        return LocalBackend()
    if name == "slurm":
        from cluster.backends.slurm import SlurmBackend

        return SlurmBackend()
    if name == "ray":
        from cluster.backends.ray_jobs import RayBackend

        return RayBackend(ray_address)
    if name == "k8s":
        from cluster.backends.k8s import K8sBackend

        return K8sBackend()
    raise ValueError(f"unknown backend {name!r} (local, slurm, ray, k8s)")


__all__ = ["TERMINAL", "Backend", "JobStatus", "get_backend"]
