"""`sar-scale generate --model DIR ...`: sample images from an export, write PNGs and a grid.

Examples::

    sar-scale generate --model exports/demo --prompt "a red circle" --prompt "two blue squares" \\
        --steps 16 --height 128 --width 128 --seed 0 --out samples/
    sar-scale generate --model exports/demo --prompts-file prompts.txt --num-images 4 --out samples/
    sar-scale generate --model exports/c2i --class-id 3 --class-id 7 --steps 8 --out samples/
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

    from sar_scale.export.pipeline import SARPipeline

logger = logging.getLogger(__name__)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Options shared by generate and edit (defaults come from the export's config.json)."""
    g = p.add_argument_group("sampling (defaults: the export's config.json)")
    g.add_argument("--steps", type=int, help="number of sets K (= sampling steps; N tokens = AR)")
    g.add_argument("--order", help="raster, random, fixed_random, spiral, zigzag or subsample")
    g.add_argument("--intervals", help="set sizes: equal, cosine, random or ar")
    g.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1 = off)")
    g.add_argument("--cfg-schedule", choices=["constant", "linear"], help="guidance schedule")
    g.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass (1 = off)")
    g.add_argument("--seed", type=int, default=0, help="seed (same seed and settings -> same images)")
    g.add_argument("--no-kv-cache", action="store_true", help="re-encode everything each step (MAR-style, slower)")
    d = p.add_argument_group("device")
    d.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    d.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="model compute dtype")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return {"steps": args.steps, "order": args.order, "intervals": args.intervals, "cfg_scale": args.cfg_scale,
            "cfg_schedule": args.cfg_schedule, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "seed": args.seed, "kv_cache": not args.no_kv_cache}


def load_pipeline(args: argparse.Namespace) -> SARPipeline:
    from sar_scale.export.pipeline import SARPipeline
    from sar_scale.export.weights import torch_dtype

    return SARPipeline.from_pretrained(args.model, device=args.device, dtype=torch_dtype(args.dtype))


class StepBars:
    """One tqdm bar per batch, advanced per sampling step (the callback of generate_tokens)."""

    def __init__(self) -> None:
        self.bar = None
        self.batch = -1

    def __call__(self, batch: int, num_batches: int, step: int, num_steps: int) -> None:
        from tqdm import tqdm

        if batch != self.batch:
            self.close()
            self.batch = batch
            self.bar = tqdm(total=num_steps, desc=f"batch {batch + 1}/{num_batches}", unit="step", leave=True)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def image_grid(images: list[Image.Image], cols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile images (same size) into one near-square PIL image."""
    from PIL import Image

    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * (w + pad), (i // cols) * (h + pad)))
    return grid


def read_prompts(args: argparse.Namespace) -> list[str] | None:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        f = Path(args.prompts_file)
        if not f.is_file():
            raise FileNotFoundError(f"--prompts-file {f}: not found")
        lines = [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines()]
        from_file = [ln for ln in lines if ln]
        if not from_file:
            raise ValueError(f"--prompts-file {f}: no prompts (one per line)")
        prompts += from_file
    return prompts or None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sar-scale generate",
        description="Sample images from a sar-scale export (text prompts or class ids) with few-step SAR "
                    "decoding and a KV cache. Writes OUT/0000.png ..., OUT/grid.png and OUT/generation.json "
                    "(settings and per-image prompt/seed), with a progress bar per batch.",
        epilog=__doc__.split("Examples::", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR", help="export directory (sar-scale export) or s3:// copy")
    p.add_argument("--prompt", action="append", help="a caption (repeatable)")
    p.add_argument("--prompts-file", metavar="FILE", help="captions, one per line")
    p.add_argument("--class-id", type=int, action="append", help="class id for class-conditional models "
                   "(repeatable; -1 = unconditional)")
    p.add_argument("--height", type=int, help="pixels, a multiple of the VQ downsample (default: trained resolution)")
    p.add_argument("--width", type=int, help="pixels, a multiple of the VQ downsample")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt / class id")
    p.add_argument("--batch-size", type=int, default=8, help="images sampled together")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    add_sampling_args(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from sar_scale.config import ConfigError

    try:
        prompts = read_prompts(args)
        if prompts is None and args.class_id is None:
            raise ValueError("give --prompt / --prompts-file (text models) or --class-id (class models)")
        pipe = load_pipeline(args)
        bars = StepBars()
        t0 = time.time()
        try:
            tokens = pipe.generate_tokens(prompts, args.height, args.width, batch_size=args.batch_size,
                                          class_ids=args.class_id, num_images_per_prompt=args.num_images,
                                          progress=bars, **sampling_kwargs(args))
        finally:
            bars.close()
        t_sample = time.time() - t0
        images = pipe.decode(tokens, args.batch_size)
    except (ConfigError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"sar-scale generate: {e}", file=sys.stderr)
        return 2
    seconds = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    conds = [c for c in (prompts if prompts is not None else args.class_id) for _ in range(args.num_images)]
    records = []
    for i, (im, c) in enumerate(zip(images, conds)):
        name = f"{i:04d}.png"
        im.save(out / name)
        records.append({"file": name, ("prompt" if prompts is not None else "class_id"): c, "index": i})
    image_grid(images).save(out / "grid.png")
    h, w = tokens.shape[1:]
    ds = pipe.downsample
    settings = {k: v for k, v in sampling_kwargs(args).items()}
    settings.update({"height": h * ds, "width": w * ds, "batch_size": args.batch_size, "dtype": args.dtype,
                     "resolved": pipe.resolve_settings(args.steps, args.order, args.intervals, args.cfg_scale,
                                                args.cfg_schedule, args.temperature, args.top_k, args.top_p)})
    (out / "generation.json").write_text(json.dumps({"model": str(args.model), "settings": settings,
                                                     "seconds": round(seconds, 3), "images": records}, indent=1))
    r = settings["resolved"]
    print(f"\nwrote {len(images)} images ({w * ds}x{h * ds} px, {h}x{w} tokens) + grid.png to {out}")
    print(f"  plan {r['order']}-{min(r['steps'], h * w)}-{r['intervals']}, cfg {r['cfg_scale']}, seed {args.seed}, "
          f"kv cache {'off' if args.no_kv_cache else 'on'}")
    print(f"  {seconds:.1f}s total ({t_sample:.1f}s sampling, {len(images) / max(seconds, 1e-9):.2f} images/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
