"""Accuracy of the shapes detector (sar_scale.eval.detector): the ceiling of the shapes eval.

On the generator's own images resized to each size, and - with ``--vq DIR`` - on their VQ
reconstructions (encode + decode), which is the best any model generating through that VQ can
score. Prints one JSON object. Examples::

    .venv/bin/python benchmarks/bench_detector.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_detector.py --vq runs/demo/vq --sizes 32 64
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image

from sar_scale.data.synthetic import make_image
from sar_scale.eval.detector import detect, score

ATTRS = ("color", "shape", "position", "all")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=300, help="square generator images per size")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 160])
    p.add_argument("--vq", help="also score VQ reconstructions (a save_vq directory)")
    p.add_argument("--seed", type=int, default=99)
    a = p.parse_args()
    vq = None
    if a.vq:
        from sar_scale.tokenizers.vq import load_vq

        vq = load_vq(a.vq).eval()
    out: dict = {"benchmark": "shapes_detector", "images": a.images, "vq": a.vq, "sizes": {}}
    for size in a.sizes:
        if vq is not None and size % vq.downsample:
            continue
        hits = {"original": dict.fromkeys(ATTRS, 0), **({"vq": dict.fromkeys(ATTRS, 0)} if vq else {})}
        t0 = time.perf_counter()
        for i in range(a.images):
            img, lab = make_image(np.random.default_rng([a.seed, i]), 160, aspect=(1, 1))
            img = img.resize((size, size), Image.BICUBIC)
            o = lab["objects"][0]
            views = {"original": np.asarray(img)}
            if vq is not None:
                x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
                with torch.no_grad():
                    y = vq.decode(vq.encode(x))
                views["vq"] = ((y[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            for name, arr in views.items():
                ok = score(detect(arr), o["color"], o["shape"], o["position"])
                for k in ATTRS:
                    hits[name][k] += ok[k]
        out["sizes"][str(size)] = {name: {k: round(v / a.images, 4) for k, v in h.items()} for name, h in hits.items()}
        out["sizes"][str(size)]["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
