"""Recipe probes for the demo model: plain single-process PyTorch training on a demo's shards, then the
shapes evaluation; prints one JSON object. This is how configs/demo/train.yaml was chosen.

Why a plain loop and not `sar-scale train`: one core per probe, two probes at once on 2 cores, and
no DeepSpeed start-up per run; a single process with batch B sees the same data per step as the demo's
2 ranks with B/2 each. Needs a finished demo workdir (its shards, and its export for the VQ and text
encoder). Examples::

    python benchmarks/probe_demo_recipe.py --work runs/demo --width 96 --layers 2 --steps 4500
    python benchmarks/probe_demo_recipe.py --work runs/demo --batch 32 --steps 1000 --num-sets 4,8,16 \\
        --intervals random,cosine --temps 0.7,0.3
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import math
import sys
import time

import numpy as np
import torch
import webdataset as wds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="a demo workdir (shards/ and model/)")
    p.add_argument("--pipe", help="export whose VQ + text encoder decode the samples (default WORK/model)")
    p.add_argument("--save", help="write the trained weights here (safetensors)")
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--layers", type=int, default=2, help="encoder layers (and decoder, unless --dec-layers)")
    p.add_argument("--dec-layers", type=int)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=4000, help="64 px steps")
    p.add_argument("--steps32", type=int, default=300, help="32 px steps first (0 = none)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batch32", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--wd", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--orders", default="random")
    p.add_argument("--num-sets", default="16")
    p.add_argument("--intervals", default="cosine")
    p.add_argument("--cond-dropout", type=float, default=0.1)
    p.add_argument("--frac-pos", action="store_true", help="fractional position embeddings (FMTConfig.frac_pos)")
    p.add_argument("--evals", default="random-16-cosine,random-8-cosine", help="plans to evaluate")
    p.add_argument("--temps", default="0.3")
    p.add_argument("--cfgs", default="2.0")
    p.add_argument("--topk", type=int, default=0)
    p.add_argument("--samples-per-prompt", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_shards(work: str, res: int) -> dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]]:
    """(token grid, text features) per bucket shape, everything in memory (a demo is 3000 samples)."""
    by: dict[tuple[int, int], list] = {}
    for tar in sorted(glob.glob(f"{work}/shards/*.tar")):
        for s in wds.WebDataset(tar, shardshuffle=False):
            tok = np.load(io.BytesIO(s[f"tokens_{res}.npy"]))
            txt = np.load(io.BytesIO(s["text.npy"])).astype(np.float32)
            by.setdefault(tok.shape, []).append((tok.reshape(-1), txt))
    if not by:
        raise SystemExit(f"no shards with tokens_{res}.npy under {work}/shards")
    return by


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    from sar_scale.eval.cli import make_generate_fn
    from sar_scale.eval.shapes import format_table, run_shapes_suite
    from sar_scale.export.pipeline import SARPipeline
    from sar_scale.models import build_model, get_config
    from sar_scale.sar import Recipe
    from sar_scale.sar.condition import Condition
    from sar_scale.sar.plan import PlanDistribution, PlanSampler
    from sar_scale.sar.sampling import set_ar_loss

    data = {r: load_shards(a.work, r) for r in (32, 64)}
    cfg = get_config("demo", width=a.width, enc_layers=a.layers, dec_layers=a.dec_layers or a.layers,
                     heads=a.heads, cond_dropout=a.cond_dropout, frac_pos=a.frac_pos)
    model = build_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    groups = [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": a.wd},
              {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.95))
    sampler = PlanSampler(PlanDistribution(orders={o: 1.0 for o in a.orders.split(",")},
                                           num_sets=[int(x) for x in a.num_sets.split(",")],
                                           intervals={i: 1.0 for i in a.intervals.split(",")}))
    gen = torch.Generator().manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)

    def batch(res: int, b: int):
        d = data[res]
        keys = list(d)
        w = np.array([len(d[k]) for k in keys], float)
        k = keys[rng.choice(len(keys), p=w / w.sum())]  # one bucket per step, as the loader
        idx = rng.choice(len(d[k]), b, replace=len(d[k]) < b)
        tok = torch.from_numpy(np.stack([d[k][i][0] for i in idx])).long()
        n = max(d[k][i][1].shape[0] for i in idx)
        txt, mask = torch.zeros(b, n, cfg.text_dim), torch.zeros(b, n, dtype=torch.bool)
        for j, i in enumerate(idx):
            t = d[k][i][1]
            txt[j, : len(t)], mask[j, : len(t)] = torch.from_numpy(t), True
        return tok, Condition(text=txt, text_mask=mask), k

    last = float("nan")
    t0 = time.time()
    model.train()
    for res, steps, b, cosine in ((32, a.steps32, a.batch32, False), (64, a.steps, a.batch, True)):
        for s in range(steps):
            lr = a.lr * min(1.0, (s + 1) / a.warmup) * (0.5 * (1 + math.cos(math.pi * s / steps)) if cosine else 1.0)
            for pg in opt.param_groups:
                pg["lr"] = lr
            tok, cond, grid = batch(res, b)
            plan = sampler.draw(grid, b, gen)
            loss = set_ar_loss(model(tok, cond.dropped(a.cond_dropout, generator=gen), plan), tok)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            last = float(loss)
            if s % 200 == 0 or s == steps - 1:
                print(f"{res} px step {s} loss {last:.3f} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    train_s = time.time() - t0

    model.eval()
    pipe = SARPipeline.from_pretrained(a.pipe or f"{a.work}/model", device="cpu")
    pipe.model = model  # the export's VQ and text encoder, this probe's transformer
    out = {"args": vars(a), "params": params, "train_s": round(train_s, 1), "final_loss": round(last, 4),
           "results": []}
    plans = [Recipe.parse(x) for x in a.evals.split(",")]
    for t in a.temps.split(","):
        for c in a.cfgs.split(","):
            fn, grid = make_generate_fn(pipe, 64, {"temperature": float(t), "cfg_scale": float(c), "top_k": a.topk},
                                        50, progress=False)
            res = run_shapes_suite(fn, plans, None, a.samples_per_prompt, a.seed, grid)
            print(f"temperature {t}, cfg {c}\n{format_table(res)}", file=sys.stderr, flush=True)
            out["results"] += [{"temperature": float(t), "cfg": float(c), "plan": r.plan, "n": r.n, **r.accuracy}
                               for r in res]
    if a.save:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, a.save)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
