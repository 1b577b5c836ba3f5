"""VQ encode throughput (images/s) on this machine's CPU (or a GPU with --device cuda).

Random weights are fine for throughput. Prints one JSON object. Example::

    .venv/bin/python benchmarks/bench_vq.py                      # VQ-16 and demo-small, batch 8/32
    .venv/bin/python benchmarks/bench_vq.py --models demo-small --batches 8 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from sar_scale.tokenizers.vq import build_vq


def bench(name: str, batch: int, size: int, repeats: int, device: str, dtype: torch.dtype | None) -> dict:
    torch.manual_seed(0)
    model = build_vq(name).to(device).eval()
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    model.encode(x[:1], dtype=dtype)  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        codes = model.encode(x, dtype=dtype)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"model": name, "batch": batch, "image_size": size, "grid": list(codes.shape[1:]),
            "params_m": round(model.num_params() / 1e6, 2), "dtype": str(dtype or torch.float32),
            "seconds_best": round(best, 4), "seconds_median": round(sorted(times)[len(times) // 2], 4),
            "images_per_s": round(batch / best, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["VQ-16", "demo-small"])
    p.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="encode under bf16 autocast")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.bf16 else None
    results = [bench(m, b, args.image_size, args.repeats, args.device, dtype)
               for m in args.models for b in args.batches]
    print(json.dumps({
        "benchmark": "vq_encode",
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
