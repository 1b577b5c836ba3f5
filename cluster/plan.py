"""`sar-scale plan CONFIG`: size a training run before paying for it.

Per curriculum stage: parameters, per-rank memory (ZeRO model states, the EMA copy, activations),
tokens per global batch, step time and GPU-hours at a stated MFU. The formulas live in
`sar_scale.training.sizing`; this module is the command around them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from sar_scale.config import ConfigError
from sar_scale.models.flops import ModelShape
from sar_scale.training.sizing import StagePlan, load_for_plan, plan_stages

H100_BF16_PEAK_TFLOPS = 989.0  # dense bf16, H100 SXM


def _fmt_table(shape: ModelShape, plans: list[StagePlan], args) -> str:
    world = args.nodes * args.gpus_per_node
    lines = [f"sar-scale plan: {args.config}",
             f"model {shape.params / 1e6:.1f}M parameters (width {shape.width}, {shape.enc_layers}+{shape.dec_layers} "
             f"blocks, vocab {shape.vocab}); {args.nodes} node(s) x {args.gpus_per_node} GPU(s) = {world} ranks; "
             f"peak {args.peak_tflops:g} TFLOP/s per GPU at MFU {args.mfu:g}; {args.gpu_mem_gib:g} GiB per GPU",
             ""]
    hdr = (f"{'stage':<14}{'res':>5}{'tok/img':>8}{'micro':>7}{'accum':>6}{'glob.batch':>11}{'tok/batch':>11}"
           f"{'ZeRO':>5}{'states':>9}{'EMA':>7}{'activ.':>9}{'total':>9}{'fits':>5}{'step s':>8}{'steps':>8}"
           f"{'images':>9}{'wall h':>8}{'GPU-h':>9}")
    lines += [hdr, "-" * len(hdr)]
    for p in plans:
        lines.append(
            f"{p.stage:<14}{p.resolution:>5}{p.tokens_per_image:>8}{p.micro_batch:>7.4g}{p.grad_accum:>6}"
            f"{p.global_batch:>11.0f}{p.tokens_per_global_batch / 1e6:>10.2f}M{p.zero_stage:>5}"
            f"{p.model_states_gib:>8.1f}G{p.ema_gib:>6.1f}G{p.activations_gib:>8.1f}G{p.total_per_rank_gib:>8.1f}G"
            f"{'yes' if p.fits else 'NO':>5}{p.step_time_s:>8.2f}{p.steps:>8}{p.images / 1e6:>8.1f}M"
            f"{p.wall_hours:>8.1f}{p.gpu_hours:>9.0f}")
    tot_h = sum(p.gpu_hours for p in plans)
    wall = sum(p.wall_hours for p in plans)
    lines += ["", f"total: {sum(p.steps for p in plans)} steps, {sum(p.images for p in plans) / 1e6:.1f}M images "
              f"seen, {wall:.1f} h wall-clock ({wall / 24:.1f} days), {tot_h:.0f} GPU-hours",
              "memory is per rank: ZeRO model states (bf16 + fp32 Adam) + fp32 EMA (if enabled) + activation "
              "estimate; leave ~15% "
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
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. model.name=fmt-xl (as `sar-scale train` takes them)")
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
        cfgs = load_for_plan(args.config, args.overrides)
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
