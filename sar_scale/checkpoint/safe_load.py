"""Restricted unpickling for DeepSpeed's own checkpoint loaders.

DeepSpeed reads its ``*.pt`` files with ``torch.load(weights_only=False)``. Inside
:func:`restricted_unpickling` torch is forced to its weights-only unpickler, with an allowlist of
the few plain-data DeepSpeed classes its checkpoints hold, so a planted ``__reduce__`` payload in a
checkpoint (local or from an S3 mirror) is refused instead of run. Checksums (COMPLETE.json) prove
integrity; this makes loading safe even when the checkpoint folder itself was tampered with.
Used by training resume, the stage switch and export.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)


def deepspeed_safe_globals() -> list[Any]:
    """Plain-data DeepSpeed classes found in ZeRO checkpoints (dataclass, enum, loss-scaler state)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler]


@contextlib.contextmanager
def restricted_unpickling(trust: bool = False) -> Iterator[None]:
    """Force torch's weights-only unpickler (plus a small allowlist) on every torch.load inside."""
    if trust:
        logger.warning("--trust-checkpoint: DeepSpeed files are unpickled without restriction")
        yield
        return
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


