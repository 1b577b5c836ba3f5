"""Sizing a training run before paying for it (what `sar-scale plan` prints).

Per curriculum stage: parameters (the model is built on the meta device, so any size costs no
memory), per-rank memory of every buffer the trainer allocates - model states (ZeRO formula, bf16
mixed precision + Adam: 16P bytes at stage 0, 4P + 12P/N at 1, 2P + 14P/N at 2, 16P/N at 3; N =
data-parallel ranks), the fp32 EMA copy when ``ema.enabled`` (4P, or 4P/N under ZeRO-3 where each
rank averages its partition, see training/ema.py) and an activation estimate - tokens per global
batch, and step time and GPU-hours at a stated MFU.

FLOPs per sample are `sar_scale.models.flops.train_flops_per_sample`, the same count as the
trainer's MFU metric (model FLOPs, set-causal attention at half its dense cost). Activations follow
Korthikanti et al. 2022 for 16-bit tensors with fused (flash/flex) attention: ~34 s*b*d bytes per
encoder block, ~42 s*b*d + 4 S*b*d per decoder block (self + cross attention + SwiGLU), plus the
logits (bf16 + fp32 for the loss); with activation checkpointing each block keeps only its input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sar_scale.models.flops import ModelShape, model_shape, train_flops_per_sample

GIB = 1024**3


def zero_state_bytes(params: int, stage: int, n: int) -> float:
    """Model-state bytes per rank: bf16 params+grads, fp32 master weights + Adam moments."""
    p = float(params)
    if stage == 0:
        return 16 * p
    if stage == 1:
        return 4 * p + 12 * p / n
    if stage == 2:
        return 2 * p + 14 * p / n
    if stage == 3:
        return 16 * p / n
    raise ValueError(f"ZeRO stage must be 0-3, got {stage}")


def ema_bytes(params: int, stage: int, n: int) -> float:
    """The fp32 EMA copy per rank: full under ZeRO 0-2, this rank's partition under ZeRO-3."""
    return 4.0 * params / (n if stage == 3 else 1)


def activation_bytes(s: ModelShape, n: int, b: float, checkpointing: bool) -> float:
    """Activation estimate per rank for a micro-batch of ``b`` images of ``n`` tokens (16-bit)."""
    enc_seq = s.cond_tokens + n
    enc_block = 34.0 * enc_seq * b * s.width
    dec_block = 42.0 * n * b * s.width + 4.0 * enc_seq * b * s.width
    logits = 6.0 * n * b * s.vocab
    if checkpointing:
        kept = 2.0 * enc_seq * b * s.width * s.enc_layers + 2.0 * n * b * s.width * s.dec_layers
        return kept + max(enc_block, dec_block) + logits
    return enc_block * s.enc_layers + dec_block * s.dec_layers + logits


@dataclass
class StagePlan:
    stage: str
    source: str
    resolution: int
    tokens_per_image: int
    micro_batch: float
    grad_accum: int
    global_batch: float
    tokens_per_global_batch: float
    zero_stage: int
    precision: str
    model_states_gib: float
    ema_gib: float
    activations_gib: float
    total_per_rank_gib: float
    fits: bool
    tflop_per_step: float
    step_time_s: float
    steps: int
    images: float
    wall_hours: float
    gpu_hours: float


def plan_stages(cfg_for_stage: list[tuple[object, str]], nodes: int, gpus_per_node: int, mfu: float,
                peak_tflops: float, gpu_mem_gib: float, downsample: int) -> tuple[ModelShape, list[StagePlan]]:
    """One StagePlan per stage; ``cfg_for_stage[i]`` = (TrainConfig that runs stage i, its file)."""
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError("plan needs --nodes >= 1 and --gpus-per-node >= 1")
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {mfu}")
    world = nodes * gpus_per_node
    m = cfg_for_stage[-1][0].model
    shape = model_shape(m.name, **m.overrides)
    out = []
    for i, (cfg, src) in enumerate(cfg_for_stage):
        st = cfg.curriculum.stages[i]
        side = st.resolution // downsample
        n = side * side
        micro = float(st.micro_batch) if st.micro_batch else st.tokens_per_batch / n
        global_batch = micro * st.grad_accum * world
        states = zero_state_bytes(shape.params, cfg.deepspeed.zero_stage, world)
        ema = ema_bytes(shape.params, cfg.deepspeed.zero_stage, world) if cfg.ema.enabled else 0.0
        acts = activation_bytes(shape, n, micro, cfg.model.activation_checkpointing)
        total = (states + ema + acts) / GIB
        step_flops = train_flops_per_sample(shape, n) * global_batch
        step_time = step_flops / world / (mfu * peak_tflops * 1e12)
        precision = cfg.deepspeed.precision
        out.append(StagePlan(
            stage=st.name, source=src, resolution=st.resolution, tokens_per_image=n, micro_batch=micro,
            grad_accum=st.grad_accum, global_batch=global_batch, tokens_per_global_batch=global_batch * n,
            zero_stage=cfg.deepspeed.zero_stage, precision="bf16" if precision == "auto" else precision,
            model_states_gib=states / GIB, ema_gib=ema / GIB, activations_gib=acts / GIB, total_per_rank_gib=total,
            fits=total <= gpu_mem_gib, tflop_per_step=step_flops / 1e12, step_time_s=step_time,
            steps=st.steps, images=global_batch * st.steps, wall_hours=step_time * st.steps / 3600,
            gpu_hours=step_time * st.steps * world / 3600))
    return shape, out


def load_for_plan(path: str, overrides: list[str] | None = None) -> list[tuple[object, str]]:
    """Stage i's config: from stage file i for a directory (what a chain runs), else the one file."""
    from sar_scale.config import load_config
    from sar_scale.training.config import TrainConfig

    p = Path(path)
    if p.is_dir():
        if overrides:
            raise ValueError("key=value overrides apply to one config file, not a directory of stage files")
        from sar_scale.training.curriculum import check_stage_files, stage_files

        files = stage_files(p)
        cfgs = check_stage_files(files)
        return [(c, str(f)) for c, f in zip(cfgs, files)]
    cfg = load_config(TrainConfig, p, overrides)
    return [(cfg, str(p))] * len(cfg.curriculum.stages)


