"""A directory of stage configs as jobs: one job walking the stages (single), or a chain of dependent
jobs. The stage-file convention and its checks live in `sar_scale.training.curriculum`."""

from __future__ import annotations

import re
from pathlib import Path

from sar_scale.training.curriculum import check_stage_files, stage_files


def job_slug(path: Path) -> str:
    """``stage2_512.yaml`` -> ``stage2-512`` (a valid job-id suffix)."""
    return re.sub(r"[^a-z0-9-]+", "-", path.stem.lower()).strip("-")


def stage_commands(directory: str | Path, extra: list[str], mode: str) -> list[tuple[str, list[str]]]:
    """``[(slug, sar-scale command)]``: one entry (single) or one per stage file (chain)."""
    files = stage_files(directory)
    check_stage_files(files, [a for a in extra if "=" in a and not a.startswith("-")])
    chosen = files[-1:] if mode == "single" else files
    return [(job_slug(f), ["train", str(f), "--resume", "auto", *extra]) for f in chosen]
