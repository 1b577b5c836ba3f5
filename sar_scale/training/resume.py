"""Resume planning: from a checkpoint's ``train_state.json`` and this job's shape to what to restore.

A pure function (no I/O, no collectives) so every rank computes the same plan and every rule has a
unit test. It decides: which stage and step to start at, whether the checkpoint is restored inside
its stage or only seeds the next stage's weights, how the optimizer state is restored (same world:
DeepSpeed's own files; another world size: resharded through a DeepSpeed universal checkpoint),
the gradient accumulation that keeps the global batch, and the data position.

The global batch is counted in *slots* (micro-batches per optimizer step over all ranks,
``grad_accum x world``); the data order is a function of it, not of the world size. A resume on
another world size keeps the checkpoint's slots by adjusting ``grad_accum`` when it divides evenly
(``checkpoint.elastic_grad_accum``); otherwise the global batch changes, and the position is then
re-counted in the new global batches (about the same number of samples consumed), which the notes
say in words.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from sar_scale.config import ConfigError
from sar_scale.data.loader import DataPosition

OptimizerRestore = Literal["none", "same_world", "reshard"]


@dataclass(frozen=True)
class StageShape:
    """What the planner needs of a curriculum stage."""

    steps: int
    grad_accum: int
    optimizer_state: str = "reset"  # "reset" | "keep": a fresh stage keeps the previous stage's moments


@dataclass(frozen=True)
class ResumePlan:
    start_stage: int
    start_step: int  # optimizer steps already done in start_stage
    grad_accum: int  # for start_stage (later stages use their config)
    position: DataPosition  # next global batch of start_stage's data order
    resume_from: str | None = None  # restore everything of start_stage from this checkpoint
    init_from: str | None = None  # start start_stage from this checkpoint's weights (stage switch)
    optimizer: OptimizerRestore = "none"  # how AdamW moments come back (from resume_from or init_from)
    global_step: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)  # log lines (rank 0 logs them)


def plan_resume(state: dict[str, Any] | None, path: str | None, world: int, stages: list[StageShape],
                zero_stage: int, allow_world_size_change: bool = True,
                elastic_grad_accum: bool = True) -> ResumePlan:
    """The plan for this job (``world`` ranks) given the checkpoint to resume (``state`` from its
    ``train_state.json``, or None for a fresh start). Raises :class:`ConfigError` for a checkpoint
    that cannot continue under this config, naming why and the way out."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if not stages:
        raise ValueError("stages: need at least one")
    if state is None:
        ga = stages[0].grad_accum
        return ResumePlan(0, 0, ga, DataPosition(0, 0, ga * world))
    notes: list[str] = []
    global_step = int(state["global_step"])
    si = int(state["stage"])
    if si >= len(stages):
        raise ConfigError(f"checkpoint {path} is at stage {si}, the config has only {len(stages)} stages")
    saved_world = int(state.get("world_size", world))
    resharded = saved_world != world
    if resharded and not allow_world_size_change:
        raise ConfigError(
            f"checkpoint {path} was written by {saved_world} ranks, this job has {world}: resume with "
            f"{saved_world} ranks, or set checkpoint.allow_world_size_change=true (the optimizer state is "
            "resharded through a DeepSpeed universal checkpoint)")
    if resharded and zero_stage == 3:
        raise ConfigError(
            f"checkpoint {path} was written by {saved_world} ranks, this job has {world}, under ZeRO-3: "
            "resharding ZeRO-3 optimizer state is not supported here (DeepSpeed universal checkpoints have "
            "open ZeRO-3 bugs, e.g. deepspeedai/DeepSpeed#6691, #7546). Resume with "
            f"{saved_world} ranks, or train with deepspeed.zero_stage 1 or 2, whose state is resharded")
    optimizer: OptimizerRestore = "reshard" if resharded else "same_world"
    if resharded:
        notes.append(f"world size {saved_world} -> {world}: the optimizer state of {path} is resharded "
                     "through a DeepSpeed universal checkpoint; weights, EMA, LR schedule and data position "
                     "carry over")

    if state.get("stage_complete") and int(state["step_in_stage"]) >= stages[si].steps:
        nxt = si + 1
        if nxt >= len(stages):  # the run is complete; nothing left to train
            ga = stages[si].grad_accum
            return ResumePlan(len(stages), 0, ga, DataPosition(0, 0, ga * world), None, path, "none",
                              global_step, tuple(notes))
        keep = stages[nxt].optimizer_state == "keep"
        ga = stages[nxt].grad_accum
        return ResumePlan(nxt, 0, ga, DataPosition(0, 0, ga * world), None, path,
                          optimizer if keep else "none", global_step, tuple(notes))

    start_step = int(state["step_in_stage"])
    data = state.get("data") or {}
    ga_cfg = stages[si].grad_accum
    saved_slots = data.get("slots")
    if "batch" not in data or saved_slots is None:
        # a checkpoint from before world-independent positions: its micro-step count maps to nothing
        ga = ga_cfg
        position = DataPosition(int(data.get("epoch", 0)) + 1, 0, ga * world)
        notes.append(f"{path} has no world-independent data position (older checkpoint): data continues at "
                     f"the start of epoch {position.epoch}")
        return ResumePlan(si, start_step, ga, position, path, None, optimizer, global_step, tuple(notes))
    saved_slots = int(saved_slots)
    ga = ga_cfg
    if ga_cfg * world != saved_slots:
        if elastic_grad_accum and saved_slots % world == 0:
            ga = saved_slots // world
            notes.append(f"grad_accum {ga_cfg} -> {ga} on {world} ranks keeps the checkpoint's global batch of "
                         f"{saved_slots} micro-batches: the same global batches continue")
        else:
            why = ("checkpoint.elastic_grad_accum is off" if not elastic_grad_accum else
                   f"{saved_slots} is not a multiple of {world} ranks")
            notes.append(
                f"global batch changes from {saved_slots} to {ga_cfg * world} micro-batches ({why}): the data "
                f"order of epoch {data['epoch']} is redefined by the new global batch, and its position "
                f"{data['batch']} is re-counted as {data['batch'] * saved_slots // (ga_cfg * world)} new "
                "global batches (about the samples consumed); within this epoch samples may repeat or be "
                "skipped, later epochs are whole")
    position = DataPosition(int(data["epoch"]), int(data["batch"]), saved_slots).rescaled(ga * world)
    return ResumePlan(si, start_step, ga, position, path, None, optimizer, global_step, tuple(notes))


__all__ = ["ResumePlan", "StageShape", "plan_resume"]
