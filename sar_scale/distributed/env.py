"""Rank / world discovery for every launcher we support, and per-rank CPU thread budgets.

torchrun, ``deepspeed``, Ray and most schedulers export the torch.distributed variables
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).
Slurm's ``srun`` exports its own (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``,
``SLURM_JOB_NODELIST`` ...), so we fall back to those. A bare ``python`` process is a world of one.
This module only reads the environment; :mod:`sar_scale.distributed.init` acts on it.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass

from sar_scale.utils.cpus import usable_cpus

logger = logging.getLogger(__name__)

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job. ``launcher`` says which variables it came from."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    launcher: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    def as_dict(self) -> dict:
        return asdict(self)


def _int(env: dict[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} must be an integer") from None


def expand_hostlist(spec: str) -> list[str]:
    """Slurm compressed host list -> host names: ``"gpu[01-03,7],cpu1"`` -> gpu01 gpu02 gpu03 gpu7 cpu1.

    Hand-written because ``scontrol show hostnames`` is only present on Slurm nodes themselves and
    we also want to resolve the list in tests and on login nodes.
    """
    hosts: list[str] = []
    # split on commas that are not inside brackets
    for part in re.split(r",(?![^\[]*\])", spec.strip()):
        if not part:
            continue
        m = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-", 1)
                width = len(lo)
                for i in range(int(lo), int(hi) + 1):
                    hosts.append(f"{prefix}{i:0{width}d}{suffix}")
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def get_dist_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables (torch.distributed names first, then Slurm's, else a world of 1)."""
    env = dict(os.environ if environ is None else environ)
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        if "LOCAL_WORLD_SIZE" in env:
            local_world = _int(env, "LOCAL_WORLD_SIZE")
        elif "SLURM_NTASKS_PER_NODE" in env:
            local_world = int(env["SLURM_NTASKS_PER_NODE"].split("(")[0])
        else:
            local_world = world
        if "GROUP_RANK" in env:  # torchrun's node index
            node_rank = _int(env, "GROUP_RANK")
        elif "NODE_RANK" in env:
            node_rank = _int(env, "NODE_RANK")
        else:
            node_rank = rank // max(1, local_world)
        launcher = ("torchrun" if "TORCHELASTIC_RUN_ID" in env else
                    "slurm" if "SLURM_PROCID" in env else "env")
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_PORT
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
        local_world = int(re.match(r"\d+", per_node).group(0)) if re.match(r"\d+", per_node) else 1
        node_rank = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else rank // max(1, local_world)
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        addr = env.get("MASTER_ADDR") or expand_hostlist(nodelist)[0]
        # A per-job port so two jobs sharing a node do not collide.
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 20000 + job % 20000
        launcher = "slurm"
    else:
        return DistEnv()
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world} (check RANK/WORLD_SIZE)")
    if not 0 <= local_rank < max(local_world, 1):
        raise ValueError(f"local rank {local_rank} is outside local world size {local_world}")
    return DistEnv(rank, world, local_rank, local_world, node_rank, addr, port, launcher)


def export_torch_env(denv: DistEnv) -> None:
    """Write the torch.distributed variables (``env://`` init reads them), e.g. after a Slurm fallback."""
    os.environ.update({
        "RANK": str(denv.rank), "WORLD_SIZE": str(denv.world_size), "LOCAL_RANK": str(denv.local_rank),
        "LOCAL_WORLD_SIZE": str(denv.local_world_size), "MASTER_ADDR": denv.master_addr,
        "MASTER_PORT": str(denv.master_port),
    })


def threads_per_rank(local_world_size: int, cores: int | None = None) -> int:
    """CPU threads each rank should use: the node's usable cores split evenly, at least 1.

    Oversubscribing (every rank using all cores) roughly halves step speed on CPU.
    """
    if cores is None:
        cores = usable_cpus()
    return max(1, cores // max(1, local_world_size))


def set_cpu_threads(denv: DistEnv) -> int:
    """Apply :func:`threads_per_rank` unless the user pinned ``OMP_NUM_THREADS`` themselves.

    torchrun sets ``OMP_NUM_THREADS=1`` for multi-process runs; we respect that value.
    """
    import torch

    if "OMP_NUM_THREADS" in os.environ:
        n = max(1, int(os.environ["OMP_NUM_THREADS"]))
    else:
        n = threads_per_rank(denv.local_world_size)
        os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    return n
