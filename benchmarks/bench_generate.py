"""Images/s of the full `generate` path (text encoder -> SAR sampling -> VQ decode) through SARPipeline,
for a demo-sized export, at steps = N (AR-like), 64, 16, 8, with and without the KV cache. Prints JSON.

The export is built from random weights (the speed does not depend on training): the `demo` FMT,
the `demo-small` VQ and a tiny T5 text encoder of the demo's text width, written with the same
`write_export` that `sar-scale export` uses, then loaded with `SARPipeline.from_pretrained`.

    python benchmarks/bench_generate.py                      # 128 px (16x16 = 256 tokens), batch 4
    python benchmarks/bench_generate.py --size 256 --steps 64 16 8 --batch 8 --device cuda

On a CPU shared with other jobs use ``--threads 1``: with 2 intra-op threads and busy cores, OpenMP's
spin-waiting made the same sampling call 10-50x slower here (0.4 s -> 4-21 s).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch


def build_demo_export(out: Path, seed: int = 0) -> float:
    """Random-weight demo export; returns the seconds `write_export` took (incl. its verification)."""
    from sar_scale.export.release import write_export
    from sar_scale.models import build_model
    from sar_scale.tokenizers.text import build_tiny_text_encoder
    from sar_scale.tokenizers.vq import build_vq, save_vq

    torch.manual_seed(seed)
    model = build_model("demo")
    vq = save_vq(build_vq("demo-small"), out.parent / "vq")
    te = build_tiny_text_encoder(out.parent / "te", kind="t5", width=model.config.text_dim, layers=2, heads=4,
                                 max_length=model.config.max_text_len)
    t = time.perf_counter()
    write_export(out, model.state_dict(), model.config, vq=vq, text_encoder=te, resolutions=[64, 128])
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128, help="square image side in px (demo VQ downsample 8)")
    ap.add_argument("--steps", type=int, nargs="+", default=None, help="steps to time (default: N 64 16 8)")
    ap.add_argument("--batch", type=int, default=4, help="images per call (one batch)")
    ap.add_argument("--repeats", type=int, default=1, help="best of R timed calls per setting")
    ap.add_argument("--cfg", type=float, default=1.0, help="CFG scale (!= 1 doubles the model batch)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--skip-nocache-above", type=int, default=1 << 30, help="skip no-cache runs with more steps")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from sar_scale.export.pipeline import SARPipeline

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        export_s = build_demo_export(Path(tmp) / "export")
        pipe = SARPipeline.from_pretrained(Path(tmp) / "export", device=args.device)
    ds = pipe.downsample
    if args.size % ds:
        raise SystemExit(f"--size must be a multiple of {ds}")
    n = (args.size // ds) ** 2
    steps_list = args.steps or [n, 64, 16, 8]
    prompts = [f"a {c} circle on the left" for c in ("red", "blue", "green", "yellow", "purple", "orange",
                                                     "pink", "gray")]
    prompts = (prompts * math.ceil(args.batch / len(prompts)))[: args.batch]
    kw = dict(height=args.size, width=args.size, cfg_scale=args.cfg, batch_size=args.batch, order="random",
              intervals="cosine")
    pipe(prompts, steps=8, seed=0, **kw)  # warm-up (allocator, kernels)
    out = {"bench": "generate", "model": "demo", "params_M": round(pipe.model.num_parameters() / 1e6, 2),
           "vq": "demo-small", "size_px": args.size, "tokens": n, "batch": args.batch, "cfg": args.cfg,
           "device": str(pipe.device), "threads": torch.get_num_threads(), "machine": platform.processor() or
           platform.machine(), "torch": torch.__version__, "export_write_and_verify_s": round(export_s, 2),
           "results": []}
    by = {}
    for k in steps_list:
        for kv in (True, False):
            if not kv and k > args.skip_nocache_above:
                continue
            best = (math.inf, 0.0, 0.0)
            for r in range(args.repeats):
                t0 = time.perf_counter()
                tokens = pipe.generate_tokens(prompts, steps=k, seed=r, kv_cache=kv, **kw)
                t1 = time.perf_counter()
                pipe.decode(tokens, args.batch)
                t2 = time.perf_counter()
                if t2 - t0 < best[0]:
                    best = (t2 - t0, t1 - t0, t2 - t1)
            row = {"steps": min(k, n), "kv_cache": kv, "seconds": round(best[0], 3),
                   "images_per_s": round(args.batch / best[0], 3), "sample_s": round(best[1], 3),
                   "decode_s": round(best[2], 3)}
            by[(min(k, n), kv)] = row
            out["results"].append(row)
    out["nocache_over_cache"] = {str(k): round(by[(k, False)]["seconds"] / by[(k, True)]["seconds"], 2)
                                 for k, kv in by if kv and (k, False) in by}
    few = min(k for k, _ in by)
    if (n, True) in by:
        out["ar_over_fewest_steps"] = round(by[(n, True)]["seconds"] / by[(few, True)]["seconds"], 2)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
