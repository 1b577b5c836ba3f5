"""Process-group setup and teardown for every launcher (torchrun, deepspeed, srun, Ray, bare python)."""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path

from sar_scale.distributed.env import DistEnv, export_torch_env, free_port, get_dist_env

logger = logging.getLogger(__name__)


def default_extensions_dir() -> str:
    """Where DeepSpeed's JIT-built ops are cached: built once (~40 s), then reused by every run."""
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch_extensions")


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu; asking for cuda without one is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is available (use device=cpu or auto)")
    return device


def resolve_backend(backend: str, device_type: str) -> str:
    if backend == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and device_type != "cuda":
        raise ValueError("deepspeed.backend=nccl needs CUDA; use gloo (or auto) on CPU")
    return backend


def init_distributed(backend: str = "auto", device: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Create the default process group (also for a world of one, which DeepSpeed requires).

    ``timeout_s`` bounds every collective: if a peer dies, the survivors raise instead of
    waiting forever (reliability promise 9). Returns the :class:`DistEnv` in effect.
    """
    import torch
    import torch.distributed as dist

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
    denv = get_dist_env()
    if denv.launcher == "none":
        # A bare process: a private single-rank group on a free loopback port.
        denv = DistEnv(master_port=free_port(), launcher="none")
    export_torch_env(denv)
    device_type = resolve_device(device)
    be = resolve_backend(backend, device_type)
    if device_type == "cuda":
        torch.cuda.set_device(denv.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=be, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=timeout_s), init_method="env://",
                                   rank=denv.rank, world_size=denv.world_size)
    logger.info("rank %d/%d (local %d/%d, node %d) via %s, backend %s, collective timeout %.0fs",
                denv.rank, denv.world_size, denv.local_rank, denv.local_world_size, denv.node_rank,
                denv.launcher, be, timeout_s)
    return denv


def destroy_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
