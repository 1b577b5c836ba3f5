"""`sar-scale tokenizer train|eval`: train the small demo VQ on CPU, or measure any VQ.

Examples::

    sar-scale tokenizer train --data data/shapes/images --out runs/vq-demo --steps 1500
    sar-scale tokenizer train --config configs/tokenizer/demo_small.yaml --data DIR --out DIR
    sar-scale tokenizer eval --vq runs/vq-demo --data data/shapes/images
    sar-scale tokenizer eval --vq vq_ds16_t2i.pt --data photos/ --image-size 256
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from sar_scale.config import ConfigError, load_config


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a small LlamaGen-architecture VQ (demo-small) on an image folder",
        description="Train a VQ with the LlamaGen architecture (default: the demo-small preset) on "
                    "an image folder (recursive jpg/png/webp) or webdataset tars with jpg/png "
                    "members. Losses: L2+L1 reconstruction, codebook, commitment (beta 0.25); "
                    "LlamaGen's GAN/LPIPS losses are not used. Writes config.json + "
                    "model.safetensors (load with sar_scale.tokenizers.vq.load_vq), "
                    "train_summary.json and heldout_reconstructions.png, and prints held-out "
                    "MSE/PSNR and codebook usage.")
    p.add_argument("--config", help="YAML with VQTrainConfig fields (flags below override it)")
    p.add_argument("--data", help="image folder, .tar, or brace pattern of webdataset tars")
    p.add_argument("--out", help="output directory for the trained VQ")
    p.add_argument("--vq", dest="vq_preset", help="VQ preset (demo-small, VQ-8, VQ-16) or VQConfig file")
    p.add_argument("--steps", type=int, help="optimizer steps (default 1500)")
    p.add_argument("--image-size", type=int, help="square training size in pixels (default 64)")
    p.add_argument("--batch-size", type=int, help="images per step (default 16)")
    p.add_argument("--lr", type=float, help="peak AdamW learning rate (default 2e-3)")
    p.add_argument("--holdout", type=float, help="held-out fraction for final metrics (default 0.1)")
    p.add_argument("--max-images", type=int, help="use at most this many images")
    p.add_argument("--seed", type=int, help="seed for init, split and batches (default 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any config field, e.g. --set vq.codebook_size=512 --set l1_weight=0.5")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="reconstruction error and codebook usage of a VQ on an image folder",
        description="Encode and decode images with a VQ (a save_vq directory, a LlamaGen .pt or a "
                    ".safetensors file) and print MSE, PSNR, codebook usage and perplexity as JSON.")
    p.add_argument("--vq", required=True, help="VQ directory or checkpoint file")
    p.add_argument("--data", required=True, help="image folder, .tar, or brace pattern of tars")
    p.add_argument("--config", help="VQ preset/config when the checkpoint has no config.json")
    p.add_argument("--image-size", type=int, default=64, help="square eval size in pixels (default 64)")
    p.add_argument("--max-images", type=int, default=None, help="use at most this many images")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _build_train_config(args: argparse.Namespace):
    from sar_scale.tokenizers.train import VQTrainConfig

    flags = {k: v for k, v in {
        "data": args.data, "out": args.out, "vq_preset": args.vq_preset, "steps": args.steps,
        "image_size": args.image_size, "batch_size": args.batch_size, "lr": args.lr,
        "holdout": args.holdout, "max_images": args.max_images, "seed": args.seed,
    }.items() if v is not None}
    flag_overrides = [f"{k}={v}" for k, v in flags.items()]
    return load_config(VQTrainConfig, args.config, [*flag_overrides, *args.overrides])


def _run_train(args: argparse.Namespace) -> int:
    from sar_scale.tokenizers.train import train_vq

    cfg = _build_train_config(args)
    summary = train_vq(cfg, progress=not args.quiet)
    m = summary["heldout"]
    print(f"trained VQ saved to {cfg.out} ({summary['params'] / 1e6:.2f}M params, downsample "
          f"{summary['downsample']}, {summary['steps']} steps in {summary['train_seconds']:.0f} s, "
          f"{summary['train_images']} train images, {summary['rejects']} rejected)")
    print(f"held-out ({m['images']} images): MSE {m['mse']:.5f}  PSNR {m['psnr']:.2f} dB  "
          f"codebook usage {m['codes_used']}/{round(m['codes_used'] / m['codebook_usage']) if m['codebook_usage'] else 0}"
          f" ({100 * m['codebook_usage']:.1f}%)  perplexity {m['perplexity']:.1f}")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from sar_scale.tokenizers.train import evaluate_vq, load_images
    from sar_scale.tokenizers.vq import load_vq

    model = load_vq(args.vq, config=args.config)
    ds = model.downsample
    if args.image_size % ds:
        raise ConfigError(f"--image-size {args.image_size} must be divisible by the VQ downsample {ds}")
    data = load_images(args.data, args.image_size, args.max_images, progress=not args.quiet)
    metrics = evaluate_vq(model, data.images_N3SS, args.batch_size, progress=not args.quiet)
    metrics["rejects"] = len(data.rejects)
    print(json.dumps(metrics, indent=2))
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sar-scale tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    _train_parser(sub)
    _eval_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "train":
            if not args.config and (args.data is None or args.out is None):
                parser.error("train needs --data and --out (or a --config that sets them)")
            return _run_train(args)
        return _run_eval(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"sar-scale tokenizer {args.cmd}: error: {e}", file=sys.stderr)
        return 2
