"""`sar-scale plan CONFIG`: size a training run before paying for it.

Per curriculum stage: parameters (the model is built on the meta device, so any size costs no
memory), per-rank memory of model states (ZeRO formula, bf16 mixed precision + Adam: 16P bytes
at stage 0, 4P + 12P/N at 1, 2P + 14P/N at 2, 16P/N at 3; N = data-parallel ranks), an activation
estimate, tokens per global batch, and step time and GPU-hours at a stated MFU.

FLOPs per sample are `sar_scale.models.flops.train_flops_per_sample`, the same count as the
trainer's MFU metric (model FLOPs, set-causal attention at half its dense cost). Activations follow
Korthikanti et al. 2022 for 16-bit tensors with fused (flash/flex) attention: ~34 s*b*d bytes per
encoder block, ~42 s*b*d + 4 S*b*d per decoder block (self + cross attention + SwiGLU), plus the
logits (bf16 + fp32 for the loss); with activation checkpointing each block keeps only its input.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from sar_scale.config import ConfigError
from sar_scale.models.flops import ModelShape, model_shape, train_flops_per_sample

H100_BF16_PEAK_TFLOPS = 989.0  # dense bf16, H100 SXM
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
        acts = activation_bytes(shape, n, micro, cfg.model.activation_checkpointing)
        total = (states + acts) / GIB
        step_flops = train_flops_per_sample(shape, n) * global_batch
        step_time = step_flops / world / (mfu * peak_tflops * 1e12)
        precision = cfg.deepspeed.precision
        out.append(StagePlan(
            stage=st.name, source=src, resolution=st.resolution, tokens_per_image=n, micro_batch=micro,
            grad_accum=st.grad_accum, global_batch=global_batch, tokens_per_global_batch=global_batch * n,
            zero_stage=cfg.deepspeed.zero_stage, precision="bf16" if precision == "auto" else precision,
            model_states_gib=states / GIB, activations_gib=acts / GIB, total_per_rank_gib=total,
            fits=total <= gpu_mem_gib, tflop_per_step=step_flops / 1e12, step_time_s=step_time,
            steps=st.steps, images=global_batch * st.steps, wall_hours=step_time * st.steps / 3600,
            gpu_hours=step_time * st.steps * world / 3600))
    return shape, out


def load_for_plan(path: str) -> list[tuple[object, str]]:
    """Stage i's config: from stage file i for a directory (what a chain runs), else the one file."""
    from sar_scale.config import load_config
    from sar_scale.training.config import TrainConfig

    p = Path(path)
    if p.is_dir():
        from cluster.curriculum import check_stage_files, stage_files

        files = stage_files(p)
        cfgs = check_stage_files(files)
        return [(c, str(f)) for c, f in zip(cfgs, files)]
    cfg = load_config(TrainConfig, p)
    return [(cfg, str(p))] * len(cfg.curriculum.stages)


def _fmt_table(shape: ModelShape, plans: list[StagePlan], args) -> str:
    world = args.nodes * args.gpus_per_node
    lines = [f"sar-scale plan: {args.config}",
             f"model {shape.params / 1e6:.1f}M parameters (width {shape.width}, {shape.enc_layers}+{shape.dec_layers} "
             f"blocks, vocab {shape.vocab}); {args.nodes} node(s) x {args.gpus_per_node} GPU(s) = {world} ranks; "
             f"peak {args.peak_tflops:g} TFLOP/s per GPU at MFU {args.mfu:g}; {args.gpu_mem_gib:g} GiB per GPU",
             ""]
    hdr = (f"{'stage':<14}{'res':>5}{'tok/img':>8}{'micro':>7}{'accum':>6}{'glob.batch':>11}{'tok/batch':>11}"
           f"{'ZeRO':>5}{'states':>9}{'activ.':>9}{'total':>9}{'fits':>5}{'step s':>8}{'steps':>8}"
           f"{'images':>9}{'wall h':>8}{'GPU-h':>9}")
    lines += [hdr, "-" * len(hdr)]
    for p in plans:
        lines.append(
            f"{p.stage:<14}{p.resolution:>5}{p.tokens_per_image:>8}{p.micro_batch:>7.4g}{p.grad_accum:>6}"
            f"{p.global_batch:>11.0f}{p.tokens_per_global_batch / 1e6:>10.2f}M{p.zero_stage:>5}"
            f"{p.model_states_gib:>8.1f}G{p.activations_gib:>8.1f}G{p.total_per_rank_gib:>8.1f}G"
            f"{'yes' if p.fits else 'NO':>5}{p.step_time_s:>8.2f}{p.steps:>8}{p.images / 1e6:>8.1f}M"
            f"{p.wall_hours:>8.1f}{p.gpu_hours:>9.0f}")
    tot_h = sum(p.gpu_hours for p in plans)
    wall = sum(p.wall_hours for p in plans)
    lines += ["", f"total: {sum(p.steps for p in plans)} steps, {sum(p.images for p in plans) / 1e6:.1f}M images "
              f"seen, {wall:.1f} h wall-clock ({wall / 24:.1f} days), {tot_h:.0f} GPU-hours",
              "memory is per rank: ZeRO model states (bf16 + fp32 Adam) + activation estimate; leave ~15% "
              "for buffers and fragmentation. FLOPs are model FLOPs (no recomputation)."]
    if not all(p.fits for p in plans):
        lines.append("WARNING: a stage does not fit: lower its micro batch / tokens_per_batch, enable "
                     "model.activation_checkpointing, or raise the ZeRO stage")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sar-scale plan", description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="TrainConfig YAML, or a directory of stage configs (configs/t2i_900m/)")
    p.add_argument("--profile", help="cluster profile: its resources give the default nodes/GPUs")
    p.add_argument("--nodes", type=int, help="nodes (default: the profile's, else 1)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: the profile's, else 8)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4; "
                   "~0.41 for 1B models on H100 in llm-foundry)")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK_TFLOPS,
                   help="per-GPU peak TFLOP/s (default 989: H100 SXM dense bf16)")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="GPU memory for the fits check (default 80)")
    p.add_argument("--downsample", type=int, default=16, help="image tokenizer downsampling (VQ-16: 16)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        from cluster.spec import load_profile

        res = load_profile(args.profile).resources if args.profile else None
        args.nodes = args.nodes or (res.nodes if res else 1)
        args.gpus_per_node = args.gpus_per_node or (res.gpus_per_node if res and res.gpus_per_node else 8)
        cfgs = load_for_plan(args.config)
        shape, plans = plan_stages(cfgs, args.nodes, args.gpus_per_node, args.mfu, args.peak_tflops,
                                   args.gpu_mem_gib, args.downsample)
    except (ConfigError, ValueError) as e:
        print(f"sar-scale plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({
            "config": args.config, "model": asdict(shape),
            "cluster": {"nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
                        "world_size": args.nodes * args.gpus_per_node, "peak_tflops": args.peak_tflops,
                        "mfu": args.mfu, "gpu_mem_gib": args.gpu_mem_gib},
            "stages": [asdict(p) for p in plans],
            "total": {"steps": sum(p.steps for p in plans), "images": sum(p.images for p in plans),
                      "wall_hours": sum(p.wall_hours for p in plans),
                      "gpu_hours": sum(p.gpu_hours for p in plans)}}, indent=2))
    else:
        print(_fmt_table(shape, plans, args))
    return 0
