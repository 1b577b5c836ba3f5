"""SAR sampling speed: AR (N steps, KV cache) vs SAR (few steps, KV cache) vs MAR-style (few steps,
no cache, recompute), same weights, one run. Prints JSON (ratios included) and a profile of where
the SAR time goes.

    python benchmarks/bench_sampling.py --model fmt-b --tokens 256 1024 --steps 64
    python benchmarks/bench_sampling.py --model fmt-b --tokens 256 --variants eager compiled
    python benchmarks/bench_sampling.py --model fmt-b --tokens 256 --batch 16 --steps 16 32 --variants eager compiled

``compiled``: the same weights with compiled blocks and the static KV cache; every plan is run once
untimed first (the compile), then timed. Several ``--steps`` give one SAR row each.
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
    ap.add_argument("--steps", type=int, nargs="+", default=[64], help="SAR steps (sets); several -> a row each")
    ap.add_argument("--variants", nargs="+", default=["eager"], choices=["eager", "compiled"])
    ap.add_argument("--skip-ar-above", type=int, default=1 << 30, help="skip the AR run above this N")
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
    models = {"eager": build_model(args.model).eval()}
    if "compiled" in args.variants:
        models["compiled"] = build_model(args.model).eval()
        models["compiled"].load_state_dict(models["eager"].state_dict())
        models["compiled"].compile_blocks()
    model = models["eager"]
    cond = Condition(class_ids=torch.zeros(args.batch, dtype=torch.long))
    out = {"model": args.model, "params_M": round(model.num_parameters() / 1e6, 1), "batch": args.batch,
           "cfg": args.cfg, "device": "cpu", "threads": torch.get_num_threads(), "machine": platform.processor(),
           "torch": torch.__version__, "results": []}
    for n in args.tokens:
        side = int(math.isqrt(n))
        assert side * side == n, "tokens must be a square number"
        grid = (side, side)
        for variant in args.variants:
            m = models[variant]

            def run(plan, kv, m=m):
                return lambda: sample(m, cond, plan, cfg_scale=args.cfg, kv_cache=kv,
                                      generator=torch.Generator().manual_seed(0))

            def timed(plan, kv, row, key, variant=variant):
                if variant == "compiled":  # the first run compiles
                    t0 = time.perf_counter()
                    run(plan, kv)()
                    row[f"{key}_warmup_s"] = round(time.perf_counter() - t0, 3)
                row[f"{key}_s"] = _time(run(plan, kv), args.repeats)
                row[f"{key}_images_per_s"] = round(args.batch / row[f"{key}_s"], 3)

            ar = SetPlan.build(grid, order="raster", intervals="ar")
            base = {"tokens": n, "grid": list(grid), "variant": variant}
            if n <= args.skip_ar_above:
                row = dict(base)
                timed(ar, True, row, "ar_kv")
                out["results"].append(row)
                print(json.dumps(row), flush=True)
            for steps in args.steps:
                k = min(steps, n)
                sar = SetPlan.build(grid, order="random", num_sets=k, intervals="cosine", batch_size=args.batch, seed=0)
                row = {**base, "sar_steps": k}
                timed(sar, True, row, "sar_kv")
                if n <= args.skip_nocache_above:
                    timed(sar, False, row, "sar_nocache")
                    row["nocache_over_cache"] = round(row["sar_nocache_s"] / row["sar_kv_s"], 2)
                ar_row = next((r for r in out["results"] if r["tokens"] == n and r["variant"] == variant
                               and "ar_kv_s" in r), None)
                if ar_row is not None:
                    row["ar_over_sar"] = round(ar_row["ar_kv_s"] / row["sar_kv_s"], 2)
                if args.profile:
                    row["sar_kv_profile"] = _profile(run(sar, True))
                out["results"].append(row)
                print(json.dumps(row), flush=True)
        if len(args.variants) == 2:
            rows = [r for r in out["results"] if r["tokens"] == n]
            for key in ("ar_kv_s", "sar_kv_s"):
                for steps in ([None] if key == "ar_kv_s" else args.steps):
                    sel = {v: next((r[key] for r in rows if r["variant"] == v and key in r
                                    and (steps is None or r.get("sar_steps") == min(steps, n))), None)
                           for v in ("eager", "compiled")}
                    if None not in sel.values():
                        name = f"{key[:-2]}{'' if steps is None else steps}_compiled_speedup"
                        out.setdefault("speedups", {})[f"{n}:{name}"] = round(sel["eager"] / sel["compiled"], 2)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
