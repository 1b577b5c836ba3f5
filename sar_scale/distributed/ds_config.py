"""The one place a TrainConfig becomes a DeepSpeed JSON config.

Optimizer and LR schedule are built by the trainer (torch AdamW + a transformers schedule) and
handed to ``deepspeed.initialize``, so the JSON here carries batch sizes, precision, ZeRO and
clipping only - except with ZeRO-Offload, which needs DeepSpeed's own CPU Adam and therefore an
``optimizer`` section.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

from sar_scale.config import apply_overrides

if TYPE_CHECKING:
    from sar_scale.training.config import TrainConfig

logger = logging.getLogger(__name__)


def resolve_precision(precision: str, device_type: str) -> str:
    """``auto`` -> bf16 on CUDA devices that support it, fp32 elsewhere (bf16 is slower on CPU)."""
    if precision != "auto":
        return precision
    if device_type == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "fp32"


def deepspeed_config(cfg: TrainConfig, world_size: int, stage: int = 0, micro_batch: int | None = None,
                     device_type: str = "cpu", override: dict[str, Any] | None = None,
                     grad_accum: int | None = None) -> dict[str, Any]:
    """DeepSpeed JSON for curriculum ``stage`` at ``world_size`` ranks.

    ``micro_batch``: the nominal per-rank micro batch (with ``tokens_per_batch`` it differs per
    bucket; DeepSpeed only uses it for its batch-size bookkeeping). ``override``: a raw DeepSpeed
    JSON deep-merged last (``--deepspeed-config``), over ``cfg.deepspeed.extra``. ``grad_accum``:
    the stage's accumulation steps when the resume planner changed them (default: the config's).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    st = cfg.curriculum.stages[stage]
    ds = cfg.deepspeed
    mb = micro_batch or st.micro_batch
    if mb is None:
        raise ValueError(f"stage {st.name!r} uses tokens_per_batch: pass the nominal micro_batch")
    ga = st.grad_accum if grad_accum is None else grad_accum
    if ga < 1:
        raise ValueError(f"grad_accum must be >= 1, got {ga}")
    precision = resolve_precision(ds.precision, device_type)
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": (device_type == "cuda" if ds.contiguous_gradients is None
                                 else ds.contiguous_gradients),
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = ds.gather_16bit_weights_on_model_save
    if ds.offload_optimizer != "none":
        if ds.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs zero_stage >= 1")
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": device_type == "cuda"}
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": ga,
        "train_batch_size": mb * ga * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,  # we log ourselves; DeepSpeed's own prints are noise
        "wall_clock_breakdown": False,
        # torch.optim.AdamW is a client optimizer DeepSpeed has not certified for every ZeRO stage.
        "zero_allow_untested_optimizer": True,
    }
    if precision == "bf16":
        out["bf16"] = {"enabled": True}
        # accumulate gradients in fp32 across micro steps (bf16 sums lose low bits)
        out["data_types"] = {"grad_accum_dtype": "fp32"}
    if ds.offload_optimizer != "none":
        lr = cfg.stage_lr(stage)
        out["optimizer"] = {"type": "AdamW", "params": {
            "lr": lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay}}
    if ds.extra:
        out = apply_overrides(out, copy.deepcopy(ds.extra))
    if override:
        out = apply_overrides(out, copy.deepcopy(override))
    _check(out, world_size)
    return out


def _check(out: dict[str, Any], world_size: int) -> None:
    """Catch inconsistent batch sizes from a raw override here, with field names, not deep in DeepSpeed."""
    mb = out.get("train_micro_batch_size_per_gpu")
    ga = out.get("gradient_accumulation_steps")
    tb = out.get("train_batch_size")
    if None not in (mb, ga, tb) and mb * ga * world_size != tb:
        raise ValueError(
            f"DeepSpeed config: train_batch_size={tb} != train_micro_batch_size_per_gpu={mb} x "
            f"gradient_accumulation_steps={ga} x world_size={world_size}")
    stage = out.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"DeepSpeed config: zero_optimization.stage must be 0-3, got {stage}")
    if out.get("fp16", {}).get("enabled") and out.get("bf16", {}).get("enabled"):
        raise ValueError("DeepSpeed config: fp16 and bf16 cannot both be enabled")
