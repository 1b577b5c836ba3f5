"""Process-group setup and teardown for every launcher (torchrun, deepspeed, srun, Ray, bare python)."""

from __future__ import annotations

import datetime
import logging
import os
import time
from pathlib import Path

from sar_scale.distributed.env import DistEnv, export_torch_env, get_dist_env
from sar_scale.utils.net import free_port

logger = logging.getLogger(__name__)

_TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_EXPORTED: list[str] = []


def default_extensions_dir() -> str:
    """Where DeepSpeed's JIT-built ops are cached: built once (~40 s), then reused by every run."""
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch_extensions")


STALE_LOCK_S = 600  # a DeepSpeed op JIT build takes ~40 s on 2 cores; a lock this old has no builder


def clear_stale_build_locks(max_age_s: float = STALE_LOCK_S, root: str | Path | None = None) -> list[Path]:
    """Remove torch-extension build locks left by a killed build (e.g. Ctrl-C during the first
    DeepSpeed start). torch waits on such a lock forever, so training would hang silently."""
    root = Path(root or os.environ.get("TORCH_EXTENSIONS_DIR") or default_extensions_dir())
    removed = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            age = time.time() - lock.stat().st_mtime
            if age > max_age_s:
                lock.unlink()
                removed.append(lock)
                logger.warning("removed a stale torch-extension build lock %s (%.0f min old)", lock, age / 60)
        except FileNotFoundError:
            pass
    return removed


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
    if denv.local_rank == 0:  # before DeepSpeed JIT-builds its ops: a stale lock would hang it forever
        clear_stale_build_locks()
    if denv.launcher == "none":
        # A bare process: a private single-rank group on a free loopback port; the variables we
        # export for env:// are removed again by destroy_distributed().
        denv = DistEnv(master_port=free_port(), launcher="none")
        _EXPORTED[:] = [k for k in _TORCH_VARS if k not in os.environ]
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
    _bound_deepspeed_world_group(timeout_s)
    logger.info("rank %d/%d (local %d/%d, node %d) via %s, backend %s, collective timeout %.0fs",
                denv.rank, denv.world_size, denv.local_rank, denv.local_world_size, denv.node_rank,
                denv.launcher, be, timeout_s)
    return denv


def _bound_deepspeed_world_group(timeout_s: float) -> None:
    """Give DeepSpeed's data-parallel group our collective timeout.

    DeepSpeed clones the world group with ``dist.new_group`` and no timeout, which means torch's
    30-minute default: a hung peer then stalls ZeRO's gradient reduction for half an hour
    regardless of the timeout we passed to init. Creating the clone ourselves (DeepSpeed only
    creates it when unset) bounds it too.
    """
    import torch.distributed as dist
    from deepspeed.utils import groups

    if getattr(groups, "_WORLD_GROUP", None) is None:
        groups._WORLD_GROUP = dist.new_group(ranks=list(range(dist.get_world_size())),
                                             timeout=datetime.timedelta(seconds=timeout_s))


def _reset_deepspeed_groups() -> None:
    """Forget DeepSpeed's cached sub-groups of the destroyed world group.

    DeepSpeed caches process groups in module globals and offers no reset; without this a second
    training run in the same process (tests, notebooks, benchmarks) fails with "Group ... is not
    registered". We only clear caches that DeepSpeed rebuilds lazily.
    """
    try:
        from deepspeed.utils import groups
    except ImportError:  # pragma: no cover - deepspeed is a hard dependency
        return
    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP",
                 "_MODEL_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP"):
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        if isinstance(getattr(groups, name, None), dict):
            getattr(groups, name).clear()


def destroy_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _reset_deepspeed_groups()
    for k in _EXPORTED:
        os.environ.pop(k, None)
    _EXPORTED.clear()
