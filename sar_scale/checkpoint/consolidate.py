"""ZeRO -> full fp32 weights: the one consolidation of a DeepSpeed checkpoint, used by the trainer (a
new curriculum stage starts from the previous stage's weights) and by `sar-scale export`.

DeepSpeed's ``zero_to_fp32`` reassembles the fp32 master weights from the optimizer partitions of
any number of ranks; it unpickles with ``weights_only=False``, so it runs under torch's weights-only
unpickler (plus DeepSpeed's few plain-data classes, checkpoint/safe_load.py): a tampered checkpoint
cannot run code even when its checksums verify, unless the user trusts it explicitly.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sar_scale.checkpoint.manager import CheckpointError
from sar_scale.checkpoint.safe_load import deepspeed_safe_globals, restricted_unpickling

logger = logging.getLogger(__name__)


def _unsafe_report(ckpt: Path) -> str:
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in deepspeed_safe_globals()}
    found = []
    for f in sorted(ckpt.rglob("*.pt")):
        try:
            bad = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(f)) if g not in allowed]
        except Exception as e:  # noqa: BLE001 - an unreadable file is itself worth naming
            bad = [f"<unreadable: {e}>"]
        if bad:
            found.append(f"{f.name}: {bad[:6]}")
    return "; ".join(found) or "(no offending globals found by the scanner)"


@contextlib.contextmanager
def _ds_prints_to_log() -> Iterator[None]:
    """zero_to_fp32 reports with print(); route it to our log instead of the user's stdout."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    for line in buf.getvalue().splitlines():
        if line.strip():
            logger.info("deepspeed: %s", line.strip())


def consolidated_state(ckpt: str | Path, kind: str, trust: bool = False, lazy: bool = True,
                       notes: list[str] | None = None) -> dict[str, Any]:
    """Full-shape weights of a DeepSpeed checkpoint folder (fp32 master weights where DeepSpeed keeps
    them). ``kind``: ``zero`` (ZeRO 1-3 partitions, any number of ranks), ``stage0`` or ``universal``.
    ``lazy`` values are DeepSpeed's lazy tensors (:func:`materialize` them); ``notes`` collects what a
    caller should tell the user. Raises :class:`CheckpointError`, naming unsafe classes, when a file
    would need code-running unpickling and ``trust`` is off."""
    ckpt = Path(ckpt)
    try:
        with restricted_unpickling(trust), _ds_prints_to_log():
            if kind == "universal":
                return _universal_state(ckpt, trust)
            if kind == "zero":
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                try:
                    sd = dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name,
                                                                       lazy_mode=lazy))
                    return sd if lazy else materialize(sd)
                except ValueError as e:
                    if "is not a zero checkpoint" not in str(e):
                        raise
                    if notes is not None:
                        notes.append("optimizer files are not ZeRO partitions: using the module weights")
            return _stage0_state(ckpt, trust)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{ckpt}: refused to unpickle a checkpoint file ({first}). Classes outside the allowlist: "
            f"{_unsafe_report(ckpt)}. If you wrote this checkpoint yourself, --trust-checkpoint "
            "allows full unpickling.") from None
    except FileNotFoundError as e:
        raise CheckpointError(f"{ckpt}: incomplete DeepSpeed checkpoint: {e}") from None


def _stage0_state(ckpt: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
    if len(files) != 1:
        raise CheckpointError(f"{ckpt}: expected one mp_rank_00_model_states.pt for a ZeRO-0 checkpoint, "
                          f"found {[f.name for f in files]} (tensor/pipeline parallel checkpoints are not supported)")
    blob = torch.load(files[0], map_location="cpu", weights_only=not trust, mmap=True)
    module = blob.get("module") if isinstance(blob, dict) else None
    if not isinstance(module, dict) or not module:
        raise CheckpointError(f"{files[0]}: no 'module' weights in the model states file")
    return dict(module)


def _universal_state(ckpt: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted((ckpt / "zero").glob("*/fp32.pt")):
        blob = torch.load(f, map_location="cpu", weights_only=not trust)
        t = blob.get("param") if isinstance(blob, dict) else blob
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{f}: no 'param' tensor (not a universal checkpoint parameter file)")
        out[f.parent.name] = t
    if not out:
        raise CheckpointError(f"{ckpt / 'zero'}: no */fp32.pt parameter files")
    return out


def materialize(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Lazy (GatheredTensor) values -> real fp32-or-native tensors."""
    return {k: (v if isinstance(v, torch.Tensor) else v.contiguous()) for k, v in state.items()}


__all__ = ["consolidated_state", "materialize"]
