"""Safetensors weights of an export, sharded the way transformers does it.

Above ``max_shard_size`` the weights go to ``model-0000i-of-0000n.safetensors`` with a
``model.safetensors.index.json`` weight map; the split is huggingface_hub's
``split_torch_state_dict_into_shards``. Writing takes a *lazy* state dict (anything with
``.shape``, ``.dtype`` and ``.contiguous()``, such as DeepSpeed's ``GatheredTensor``) and
materialises one shard at a time, so memory stays bounded by the largest shard. Loading reads only
safetensors (no pickle) and checks keys and shapes strictly, naming what does not match.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sar_scale.export.config import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_PATTERN
from sar_scale.utils.atomic import atomic_path, atomic_write_json

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(TORCH_DTYPES)}, got {name!r}")
    return TORCH_DTYPES[name]


def _target_dtype(t: Any, dtype: torch.dtype) -> torch.dtype:
    return dtype if t.dtype.is_floating_point else t.dtype


def _share(path: Path) -> None:
    # safetensors creates files 0600; a release is meant to be read by others (umask still applies)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_sharded(state: Mapping[str, Any], out_dir: str | Path, dtype: torch.dtype = torch.float32,
                 max_shard_size: int | str = "5GB", metadata: dict[str, str] | None = None) -> list[str]:
    """Write ``state`` (cast to ``dtype``; integer tensors keep theirs) into ``out_dir``; returns file names.

    Files are written under a temporary name and renamed, the index last, so a crash never
    leaves an index pointing at a half-written shard.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {k: torch.empty(tuple(v.shape), dtype=_target_dtype(v, dtype), device="meta") for k, v in state.items()}
    split = split_torch_state_dict_into_shards(meta, filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size)
    for stale in [*out.glob("model*.safetensors"), out / WEIGHTS_INDEX_NAME]:
        stale.unlink(missing_ok=True)  # a previous export into the same directory
    md = {"format": "pt", **(metadata or {})}
    items = split.filename_to_tensors.items()
    for fname, keys in tqdm(items, desc="writing safetensors", disable=len(items) < 2):
        shard = {k: state[k].contiguous().to(_target_dtype(state[k], dtype)).contiguous() for k in keys}
        with atomic_path(out / fname) as tmp:
            save_file(shard, str(tmp), metadata=md)
        _share(out / fname)
        del shard
    if split.is_sharded:
        index = {"metadata": {**split.metadata, **md}, "weight_map": split.tensor_to_filename}
        atomic_write_json(out / WEIGHTS_INDEX_NAME, index, sort_keys=True)
        logger.info("wrote %d weight shards (max %s each) + %s", len(items), max_shard_size, WEIGHTS_INDEX_NAME)
    return sorted(split.filename_to_tensors)


def weight_files(export_dir: str | Path) -> list[Path]:
    """The safetensors files of an export (from the index when sharded)."""
    d = Path(export_dir)
    index = d / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        files = [d / f for f in sorted(set(wmap.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard(s) that are missing: {missing}")
        return files
    if (d / WEIGHTS_NAME).is_file():
        return [d / WEIGHTS_NAME]
    raise FileNotFoundError(f"{d}: no {WEIGHTS_NAME} and no {WEIGHTS_INDEX_NAME}")


def load_state_dict(export_dir: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All weights of an export (safetensors only: nothing is unpickled)."""
    from safetensors.torch import load_file

    d = Path(export_dir)
    files = weight_files(d)
    state: dict[str, torch.Tensor] = {}
    index = d / WEIGHTS_INDEX_NAME
    wmap = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    for f in files:
        part = load_file(str(f), device=str(device))
        if wmap is not None:
            extra = [k for k in part if wmap.get(k) != f.name]
            if extra:
                raise ValueError(f"{f}: holds tensors the index does not map to it: {extra[:5]}")
        state.update(part)
    if wmap is not None:
        missing = sorted(set(wmap) - set(state))
        if missing:
            raise ValueError(f"{d / WEIGHTS_INDEX_NAME}: tensors listed but not found in any shard: {missing[:5]}")
    return state


def check_state_dict(model: torch.nn.Module, state: Mapping[str, Any], source: str) -> None:
    """Raise ValueError naming missing/unexpected keys and shape mismatches (strict, before loading)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"weights from {source} do not match the model config:"]
        if missing:
            parts.append(f"  missing ({len(missing)}): {missing[:6]}")
        if unexpected:
            parts.append(f"  unexpected ({len(unexpected)}): {unexpected[:6]}")
        if shapes:
            parts.append(f"  shape mismatches ({len(shapes)}): {shapes[:6]}")
        raise ValueError("\n".join(parts))


__all__ = ["TORCH_DTYPES", "check_state_dict", "load_state_dict", "save_sharded", "torch_dtype", "weight_files"]
