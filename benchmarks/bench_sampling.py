"""SAR sampling speed: AR (N steps, KV cache) vs SAR (few steps, KV cache) vs MAR-style (few steps,
no cache, recompute), same weights, one run. Prints JSON (ratios included) and a profile of where
the SAR time goes.

    python benchmarks/bench_sampling.py --model fmt-b --tokens 256 1024 --steps 64
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch

from sar_scale.models import build_model
from sar_scale.sar import Condition, SetPlan, sample


def _time(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _profile(fn, top: int = 8) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1
    return [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 1),
             "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmt-b", help="named size (fmt-b = ~125M params)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1024], help="N = h*w (square grids)")
    ap.add_argument("--steps", type=int, default=64, help="SAR steps (sets)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cfg", type=float, default=1.0, help="CFG scale (!= 1 doubles the batch)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--skip-nocache-above", type=int, default=1024, help="skip the recompute run above this N")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="profile one SAR+cache run per N")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model).eval()
    cond = Condition(class_ids=torch.zeros(args.batch, dtype=torch.long))
    out = {"model": args.model, "params_M": round(model.num_parameters() / 1e6, 1), "batch": args.batch,
           "cfg": args.cfg, "device": "cpu", "threads": torch.get_num_threads(), "machine": platform.processor(),
           "torch": torch.__version__, "results": []}
    for n in args.tokens:
        side = int(math.isqrt(n))
        assert side * side == n, "tokens must be a square number"
        grid = (side, side)
        k = min(args.steps, n)
        ar = SetPlan.build(grid, order="raster", intervals="ar")
        sar = SetPlan.build(grid, order="random", num_sets=k, intervals="cosine", batch_size=args.batch, seed=0)

        def run(plan, kv):
            return lambda: sample(model, cond, plan, cfg_scale=args.cfg, kv_cache=kv,
                                  generator=torch.Generator().manual_seed(0))

        row = {"tokens": n, "grid": list(grid), "sar_steps": k}
        row["ar_kv_s"] = _time(run(ar, True), args.repeats)
        row["sar_kv_s"] = _time(run(sar, True), args.repeats)
        if n <= args.skip_nocache_above:
            row["sar_nocache_s"] = _time(run(sar, False), args.repeats)
            row["nocache_over_cache"] = round(row["sar_nocache_s"] / row["sar_kv_s"], 2)
        row["ar_over_sar"] = round(row["ar_kv_s"] / row["sar_kv_s"], 2)
        if args.profile:
            row["sar_kv_profile"] = _profile(run(sar, True))
        out["results"].append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
