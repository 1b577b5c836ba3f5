"""`sar-scale sample`: a quick SAR smoke run on CPU - train a tiny model on a few random token grids
with random orders and random intervals, then sample them back with other plans (AR and few-step).

It shows the core works without data, tokenizer or launcher; the full system runs in `sar-scale demo`.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm import tqdm

from sar_scale.models import build_model
from sar_scale.sar import Condition, PlanDistribution, PlanSampler, SetPlan, sample, set_ar_loss


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sar-scale sample", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="debug", help="named model size (default: debug)")
    ap.add_argument("--grid", type=int, nargs=2, default=[4, 6], metavar=("H", "W"), help="token grid")
    ap.add_argument("--num-grids", type=int, default=4, help="how many class-conditional grids to learn")
    ap.add_argument("--steps", type=int, default=300, help="training steps")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    h, w = args.grid
    vocab = 16
    model = build_model(args.model, vocab_size=vocab, num_classes=args.num_grids, cond="class")
    grids = torch.randint(0, vocab, (args.num_grids, h * w), generator=torch.Generator().manual_seed(args.seed))
    cond = Condition(class_ids=torch.arange(args.num_grids))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sampler = PlanSampler(PlanDistribution(orders={"random": 1.0}, num_sets=[2, 4, 8], intervals={"random": 1.0}))
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    bar = tqdm(range(args.steps), desc="train (random order, random intervals)")
    for _ in bar:
        plan = sampler.draw((h, w), args.num_grids, g)
        loss = set_ar_loss(model(grids, cond, plan), grids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    train_s = time.time() - t0
    results = {}
    for name, plan in {
        "raster-AR": SetPlan.build((h, w), order="raster", intervals="ar"),
        "raster-4-equal": SetPlan.build((h, w), order="raster", num_sets=4, intervals="equal"),
        "random-4-cosine": SetPlan.build((h, w), order="random", num_sets=4, intervals="cosine",
                                         batch_size=args.num_grids),
        "spiral-2-equal": SetPlan.build((h, w), order="spiral", num_sets=2, intervals="equal"),
    }.items():
        t = time.time()
        out = sample(model, cond, plan, temperature=0.0)
        results[name] = {"token_accuracy": round((out == grids).float().mean().item(), 4),
                         "exact_grids": int((out == grids).all(1).sum()), "seconds": round(time.time() - t, 3)}
    summary = {"model": args.model, "params": model.num_parameters(), "grid": [h, w],
               "final_loss": round(loss.item(), 5), "train_seconds": round(train_s, 1), "sampling": results}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"\nSAR smoke run: {args.model} ({summary['params']:,} params), grid {h}x{w}, "
              f"final loss {summary['final_loss']} after {args.steps} steps ({summary['train_seconds']} s)")
        print(f"{'plan':<18}{'token acc':>10}{'exact':>8}{'seconds':>9}")
        for name, r in results.items():
            print(f"{name:<18}{r['token_accuracy']:>10.3f}{r['exact_grids']:>5}/{args.num_grids:<2}{r['seconds']:>9.3f}")
    return 0
