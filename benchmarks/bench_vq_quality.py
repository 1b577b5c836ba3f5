"""Quality of the self-trained demo VQ on the demo's shapes data; prints one JSON object.

Generates square shapes images with the demo's own generator (sar_scale.data.synthetic), trains
a VQ with `train_vq` (default: the demo-small preset), and reports on held-out images: PSNR,
codebook usage, and the accuracy of the demo's hue detector (sar_scale.eval.detector) on the
reconstructions vs on the originals. This is the "colours survive the tokenizer" figure the
unit tests cannot afford. Example::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_vq_quality.py --size 64 --steps 600
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sar_scale.config import parse_overrides
from sar_scale.data.synthetic import make_image
from sar_scale.eval.detector import detect
from sar_scale.tokenizers.train import (
    VQTrainConfig,
    load_images,
    split_holdout,
    to_model_range,
    to_uint8,
    train_vq,
)
from sar_scale.tokenizers.vq import load_vq


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="VQTrainConfig field, e.g. --set vq.norm_groups=32")
    p.add_argument("--out", default=None, help="keep the trained VQ here (default: a temp dir)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "shapes"
        data_dir.mkdir()
        rng = np.random.default_rng(args.seed)
        for i in range(args.images):
            img, lab = make_image(rng, size=args.size, aspect=(1, 1))
            img.save(data_dir / f"{i:05d}_{lab['objects'][0]['color']}.png")
        out = args.out or str(Path(tmp) / "vq")
        fields = {"data": str(data_dir), "out": out, "image_size": args.size, "steps": args.steps,
                  "seed": args.seed, "threads": args.threads, **parse_overrides(args.overrides)}
        cfg = VQTrainConfig(**fields)
        t0 = time.time()
        summary = train_vq(cfg, progress=False)
        wall = time.time() - t0
        vq = load_vq(out)
        data = load_images(data_dir, args.size, progress=False)
        _, hold = split_holdout(len(data.names), cfg.holdout, cfg.seed)
        x_u8 = data.images_N3SS[hold]
        rec_u8 = to_uint8(vq.decode(vq.encode(to_model_range(x_u8))))
    truth = [data.names[i].split("_")[1].removesuffix(".png") for i in hold]
    on_orig = np.mean([detect(x.permute(1, 2, 0).numpy()).color == t for x, t in zip(x_u8, truth)])
    on_rec = np.mean([detect(r.permute(1, 2, 0).numpy()).color == t for r, t in zip(rec_u8, truth)])
    print(json.dumps({
        "benchmark": "vq_quality_shapes", "vq": cfg.vq_config().model_dump(), "image_size": args.size,
        "steps": args.steps, "train_images": summary["train_images"], "heldout_images": len(hold),
        "heldout_psnr_db": round(summary["heldout"]["psnr"], 2),
        "codebook_usage": round(summary["heldout"]["codebook_usage"], 4),
        "hue_accuracy_reconstruction": round(float(on_rec), 3),
        "hue_accuracy_original": round(float(on_orig), 3),
        "train_wall_s": round(wall, 1), "torch_threads": torch.get_num_threads(),
    }, indent=2))


if __name__ == "__main__":
    main()
