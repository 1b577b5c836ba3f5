"""Throughput of `data prepare` at 256 px with the demo VQ vs the bare VQ encode on the same cores.

Prints one JSON object:
  vq_encode_img_s_{t}thread  bare ``VQModel.encode`` on the same bucketed 256 px crops (no I/O, no
                             Ray), measured before and after the pipeline runs (shared machine)
  pipeline[...]              end to end per Ray layout: scan + decode + bucket + tokenize + write,
                             as images/s over the whole job (Ray already started) and over the
                             shard pass only; overhead = bare encode img/s / pipeline img/s
Usage: .venv/bin/python benchmarks/bench_pipeline.py [--n 48] [--res 256]
The VQ has random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path


def bare_encode(vq, crops: dict[tuple[int, int], list], threads: int, batch: int) -> float:
    """img/s of VQModel.encode alone on the same bucketed crops the pipeline tokenizes."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    tensors = []
    for imgs in crops.values():
        x = torch.from_numpy(np.stack([np.array(i) for i in imgs])).permute(0, 3, 1, 2).float() / 127.5 - 1
        tensors += [x[i: i + batch] for i in range(0, len(x), batch)]
    vq.encode(tensors[0][:1])  # warm-up
    t0 = time.perf_counter()
    for x in tensors:
        vq.encode(x)
    return sum(len(x) for x in tensors) / (time.perf_counter() - t0)


def bucketed_crops(folder: Path, res: int, downsample: int) -> dict[tuple[int, int], list]:
    from PIL import Image

    from sar_scale.data.buckets import bucket_list, nearest_bucket, resize_center_crop

    buckets = bucket_list(res, downsample)
    out: dict[tuple[int, int], list] = {}
    for f in sorted(folder.glob("*.png")):
        img = Image.open(f).convert("RGB")
        b = nearest_bucket(*img.size, buckets)
        out.setdefault(b, []).append(resize_center_crop(img, b))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=48, help="images per pipeline run")
    p.add_argument("--res", type=int, default=256, help="base resolution")
    p.add_argument("--batch", type=int, default=8, help="VQ batch size")
    a = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import torch

    from pipelines.config import PrepareConfig
    from pipelines.prepare import run
    from sar_scale.config import load_config
    from sar_scale.data.synthetic import ShapesConfig, generate
    from sar_scale.tokenizers.vq import build_vq, save_vq

    cpus = os.cpu_count() or 1
    out: dict = {"machine_cpus": cpus, "res": a.res, "images": a.n, "vq": "demo-small (random weights)"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        vq = build_vq("demo-small").eval()
        save_vq(vq, tmp / "vq")
        generate(tmp / "img", ShapesConfig(n=a.n, seed=0, size=a.res), progress=False)
        crops = bucketed_crops(tmp / "img", a.res, vq.downsample)
        out["load_avg_before"] = [round(x, 2) for x in os.getloadavg()]
        bare: dict[str, list[float]] = {}
        for t in sorted({1, cpus}):
            bare.setdefault(f"vq_encode_img_s_{t}thread", []).append(bare_encode(vq, crops, t, a.batch))

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        out["ray_start_s"] = round(time.perf_counter() - t0, 2)
        load = 0.25
        layouts = {"1_worker_1cpu": (1, (cpus - load) / 2 if cpus >= 2 else cpus - load),
                   "2_workers_1cpu_each": (2, (cpus - load) / 2),
                   "1_worker_all_cpus": (1, cpus - load)}
        runs = {}
        for name, (actors, acpu) in layouts.items():
            cfg = load_config(PrepareConfig, {
                "input": {"path": str(tmp / "img")},
                "filters": {"min_side": 64, "near_dedup": False},
                "tokenize": {"vq_path": str(tmp / "vq"), "resolutions": [a.res], "batch_size": a.batch},
                "output": {"url": str(tmp / f"out_{name}"), "samples_per_shard": 16},
                "ray": {"tokenize_actors": actors, "actor_num_cpus": acpu, "load_num_cpus": load}})
            t0 = time.perf_counter()
            s = run(cfg)
            wall = time.perf_counter() - t0
            runs[name] = {"actors": actors, "actor_num_cpus": round(acpu, 3), "torch_threads_per_actor":
                          max(1, math.ceil(acpu)), "samples": s["samples"], "wall_s": round(wall, 2),
                          "img_s_end_to_end": round(s["samples"] / wall, 3),
                          "img_s_shard_pass": s["tokenize_images_per_s"]}
        ray.shutdown()
        for t in sorted({1, cpus}):  # again after: the machine is shared, report both
            bare[f"vq_encode_img_s_{t}thread"].append(bare_encode(vq, crops, t, a.batch))
        out["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    for k, v in bare.items():
        out[k] = [round(x, 3) for x in v]
    best_bare = max(max(v) for v in bare.values())
    out["best_bare_encode_img_s"] = round(best_bare, 3)
    for r in runs.values():
        r["overhead_vs_bare_encode"] = round(best_bare / r["img_s_end_to_end"], 2)
    out["pipeline"] = runs
    out["scaling_2_vs_1_workers"] = round(runs["2_workers_1cpu_each"]["img_s_end_to_end"]
                                          / runs["1_worker_1cpu"]["img_s_end_to_end"], 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
