"""Checkpoints: DeepSpeed save on all ranks + JSON train state, COMPLETE marker with sha256, verified resume."""

from sar_scale.checkpoint.manager import (
    CheckpointError,
    CheckpointManager,
    list_checkpoints,
    read_train_state,
    tag_for,
    verify_checkpoint,
)

__all__ = ["CheckpointError", "CheckpointManager", "list_checkpoints", "read_train_state", "tag_for",
           "verify_checkpoint"]
