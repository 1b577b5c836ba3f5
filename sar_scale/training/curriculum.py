"""A directory of stage configs: the files of a curriculum and the rule that chains them soundly.

`sar-scale submit --stages single|chain` turns them into jobs (cluster/curriculum.py).

Convention (``configs/t2i_900m/`` follows it): ``stage<N>_<name>.yaml`` files, numbered in run
order, each a complete TrainConfig whose curriculum is the *previous file's stages plus one*, all
with the same ``run_dir``/checkpoint location. Then

* **single**: one job runs the last file (the whole curriculum); the trainer walks the stages and
  ``--resume auto`` makes a restarted job continue where it stopped;
* **chain**: job k runs file k with ``--resume auto``, starting after job k-1 succeeded (Slurm
  ``--dependency=afterok``); it resumes from the checkpoint that ended stage k-1 (stage-end
  checkpoints are kept) and stops at the end of stage k, because file k's curriculum ends there.

Because per-stage schedules are defined per stage, the chain trains exactly what the single job
would. :func:`check_stage_files` verifies the prefix rule so a chain cannot silently restart.
"""

from __future__ import annotations

import re
from pathlib import Path

from sar_scale.config import ConfigError

STAGE_FILE_RE = re.compile(r"^stage(\d+)(?:[-_][A-Za-z0-9_.-]*)?\.ya?ml$")


def stage_files(directory: str | Path) -> list[Path]:
    """``stage<N>*.yaml`` in run order (by N)."""
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"{d} is not a directory of stage configs")
    found = []
    for p in d.iterdir():
        m = STAGE_FILE_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    if not found:
        raise ConfigError(f"{d}: no stage<N>_<name>.yaml files (see configs/t2i_900m/ for the layout)")
    nums = [n for n, _ in found]
    if len(set(nums)) != len(nums):
        raise ConfigError(f"{d}: two stage files share a number: {sorted(p.name for _, p in found)}")
    return [p for _, p in sorted(found)]


def check_stage_files(files: list[Path], overrides: list[str] | None = None) -> list:
    """Load each file as a TrainConfig and check the chain is sound; returns the configs.

    Each file's stages must extend the previous file's stages unchanged, and all files must share
    the run folder and checkpoint locations (else ``--resume auto`` would not find the previous
    stage's checkpoint).
    """
    from sar_scale.config import load_config
    from sar_scale.training.config import TrainConfig

    cfgs = [load_config(TrainConfig, f, overrides) for f in files]
    for i in range(1, len(cfgs)):
        prev, cur, f = cfgs[i - 1], cfgs[i], files[i]
        ps, cs = prev.curriculum.stages, cur.curriculum.stages
        if len(cs) != len(ps) + 1 or [s.model_dump() for s in cs[:len(ps)]] != [s.model_dump() for s in ps]:
            raise ConfigError(f"{f}: curriculum.stages must be {files[i - 1].name}'s stages "
                              f"({[s.name for s in ps]}) plus exactly one new stage; got {[s.name for s in cs]}")
        for field in ("run_dir",):
            if getattr(cur, field) != getattr(prev, field):
                raise ConfigError(f"{f}: {field} differs from {files[i - 1].name}; every stage file must "
                                  f"share it so --resume auto finds the previous stage's checkpoint")
        for field in ("dir", "mirror_url"):
            if getattr(cur.checkpoint, field) != getattr(prev.checkpoint, field):
                raise ConfigError(f"{f}: checkpoint.{field} differs from {files[i - 1].name}; every stage "
                                  f"file must share it")
        if not prev.checkpoint.keep_stage_ends:
            raise ConfigError(f"{files[i - 1]}: checkpoint.keep_stage_ends must be true for a chain "
                              f"(the next job resumes from the stage-end checkpoint)")
    if len(cfgs[0].curriculum.stages) != 1:
        raise ConfigError(f"{files[0]}: the first stage file must hold exactly one stage")
    return cfgs
