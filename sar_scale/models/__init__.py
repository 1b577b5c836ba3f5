"""FMT architecture and named sizes. ``build_model("debug")``; ``count_parameters("t2i-900m")``."""

from __future__ import annotations

import torch

from sar_scale.models.config import MODEL_SIZES, FMTConfig, get_config
from sar_scale.models.fmt import FullyMaskedTransformer, KVCache


def build_model(name_or_config: str | dict | FMTConfig, device: torch.device | str | None = None,
                **overrides) -> FullyMaskedTransformer:
    """Build a model from a named size (``debug``, ``demo``, ``fmt-b``, ``fmt-l``, ``fmt-xl``,
    ``t2i-900m``), a dict or an FMTConfig; ``device="meta"`` builds without memory."""
    cfg = get_config(name_or_config, **overrides)
    if device is not None:
        with torch.device(device):
            return FullyMaskedTransformer(cfg)
    return FullyMaskedTransformer(cfg)


def count_parameters(name_or_config: str | dict | FMTConfig, **overrides) -> int:
    """Parameter count on the meta device (no memory, any size)."""
    return build_model(name_or_config, device="meta", **overrides).num_parameters()


__all__ = ["MODEL_SIZES", "FMTConfig", "FullyMaskedTransformer", "KVCache", "build_model",
           "count_parameters", "get_config"]
