"""The shapes suite: does the model draw what the prompt asks for, per sampling plan?

Prompts cover every (color, shape, position) combination of the synthetic shapes vocabulary
(sar_scale.data.synthetic), each image is classified by the deterministic detector
(sar_scale.eval.detector), and accuracy is reported per attribute and for all three at once, for
each sampling plan (AR raster order vs SAR at K steps, random vs raster order). Images, per-image
detections and a sample grid per plan are written to the output folder so every number can be
checked by eye.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from sar_scale.data.synthetic import COLORS, POSITIONS, SHAPES, caption_for
from sar_scale.eval.detector import detect, score
from sar_scale.sar import Recipe

logger = logging.getLogger(__name__)

ATTRIBUTES = ("color", "shape", "position", "all")

# prompts -> plan -> seed -> one image per prompt
GenerateFn = Callable[[list[str], Recipe, int], list[Image.Image]]


@dataclass(frozen=True)
class ShapesPrompt:
    caption: str
    color: str
    shape: str
    position: str


def shapes_prompts(template: int = 0) -> list[ShapesPrompt]:
    """All color x shape x position prompts (5 x 3 x 5 = 75), captioned like the training data."""
    out = []
    for color in COLORS:
        for shape in SHAPES:
            for position in POSITIONS:
                cap = caption_for([{"color": color, "shape": shape, "position": position}], template)
                out.append(ShapesPrompt(cap, color, shape, position))
    return out


@dataclass
class PlanResult:
    plan: str
    n: int
    accuracy: dict[str, float]
    seconds: float
    grid_png: str | None = None
    per_prompt: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        return {"plan": self.plan, "n": self.n, **{f"acc_{k}": v for k, v in self.accuracy.items()},
                "seconds": self.seconds, "grid_png": self.grid_png}


def accuracy_of(rows: list[dict[str, bool]]) -> dict[str, float]:
    if not rows:
        raise ValueError("no images to score")
    return {a: sum(r[a] for r in rows) / len(rows) for a in ATTRIBUTES}


def image_grid(images: list[Image.Image], captions: list[str] | None = None, cols: int = 15,
               marks: list[bool] | None = None, label_height: int = 0) -> Image.Image:
    """Tile images (all resized to the first one's size); optional green/red frame per image."""
    if not images:
        raise ValueError("no images for a grid")
    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    cell_h = h + label_height
    canvas = Image.new("RGB", (cols * w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * cell_h
        canvas.paste(im.convert("RGB").resize((w, h)), (x, y))
        if marks is not None:
            draw.rectangle([x, y, x + w - 1, y + h - 1], outline=(0, 170, 0) if marks[i] else (220, 0, 0))
        if captions and label_height:
            draw.text((x + 2, y + h + 1), captions[i][:24], fill=(0, 0, 0))
    return canvas


def score_images(images: list[Image.Image], prompts: list[ShapesPrompt]) -> list[dict[str, Any]]:
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
    rows = []
    for im, p in zip(images, prompts):
        det = detect(im)
        ok = score(det, p.color, p.shape, p.position)
        rows.append({"caption": p.caption, "want": {"color": p.color, "shape": p.shape, "position": p.position},
                     "got": {"color": det.color, "shape": det.shape, "position": det.position},
                     "fill": det.fill, "hue": det.hue, "centroid": det.centroid, **ok})
    return rows


def run_shapes_suite(generate: GenerateFn, plans: list[Recipe], out_dir: str | Path | None = None,
                     samples_per_prompt: int = 1, seed: int = 0, grid: tuple[int, int] | None = None,
                     prompts: list[ShapesPrompt] | None = None,
                     progress: Callable[[str], None] | None = None) -> list[PlanResult]:
    """Generate every prompt ``samples_per_prompt`` times per plan and score the images.

    ``grid`` only names plans (``raster-64-ar``); ``generate`` decides the resolution.
    Seeds differ per repetition (``seed + r``) and are the same across plans, so plans are compared
    on the same noise where the sampler allows it.
    """
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    if not plans:
        raise ValueError("no sampling plans to evaluate")
    prompts = prompts or shapes_prompts()
    out = Path(out_dir) if out_dir else None
    results = []
    for plan in plans:
        name = plan.name(grid)
        if progress:
            progress(name)
        t0 = time.perf_counter()
        images: list[Image.Image] = []
        all_prompts: list[ShapesPrompt] = []
        for r in range(samples_per_prompt):
            images += generate([p.caption for p in prompts], plan, seed + r)
            all_prompts += prompts
        secs = time.perf_counter() - t0
        rows = score_images(images, all_prompts)
        res = PlanResult(name, len(rows), accuracy_of(rows), round(secs, 2), per_prompt=rows)
        if out is not None:
            pdir = out / name
            (pdir / "images").mkdir(parents=True, exist_ok=True)
            for i, (im, row) in enumerate(zip(images, rows)):
                fname = f"{i:04d}.png"
                im.save(pdir / "images" / fname)
                row["image"] = f"images/{fname}"
            with open(pdir / "detections.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            grid_img = image_grid(images[: len(prompts)], marks=[r["all"] for r in rows[: len(prompts)]])
            grid_img.save(pdir / "grid.png")
            res.grid_png = str(pdir / "grid.png")
        logger.info("%s: all-three %.1f%% (color %.1f%%, shape %.1f%%, position %.1f%%) on %d images in %.1f s",
                    name, 100 * res.accuracy["all"], 100 * res.accuracy["color"], 100 * res.accuracy["shape"],
                    100 * res.accuracy["position"], res.n, secs)
        results.append(res)
    return results


def format_table(results: list[PlanResult], title: str = "shapes accuracy") -> str:
    """A plain-text table: one row per plan, accuracy per attribute and all three."""
    w = max([len(r.plan) for r in results] + [4])
    lines = [title, f"{'plan'.ljust(w)}  {'n':>5}  {'color':>6}  {'shape':>6}  {'pos':>6}  {'all-3':>6}  {'sec':>7}"]
    for r in results:
        a = r.accuracy
        lines.append(f"{r.plan.ljust(w)}  {r.n:>5}  {100 * a['color']:>5.1f}%  {100 * a['shape']:>5.1f}%  "
                     f"{100 * a['position']:>5.1f}%  {100 * a['all']:>5.1f}%  {r.seconds:>7.1f}")
    return "\n".join(lines)
