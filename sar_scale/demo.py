"""`sar-scale demo`: the whole system, end to end, on one CPU machine with embedded defaults.

Stages (each one the real CLI in a subprocess, its output in WORKDIR/logs/<stage>.log):

1. synth      synthetic "shapes" images + captions, plus a few corrupt files and a held-out set
2. vq         the small VQ tokenizer: the shipped one for the default images, else trained on the demo
              images (cached by data + config hash)
3. text       a tiny text encoder (word-level tokenizer + 2-layer T5 encoder, built offline)
4. prepare    the Ray pipeline: validate, reject, bucket, VQ-tokenize, text features -> shards
5. train      DeepSpeed ZeRO-1 on 2 CPU ranks (torchrun), 2-stage resolution curriculum, MLflow
6. export     consolidate the checkpoint into a self-contained release (safetensors + tokenizers)
7. samples    a PNG grid for a fixed prompt list (`sar-scale generate`)
8. eval       shapes accuracy per sampling plan + token NLL on the held-out shards, into MLflow

Then a summary of where everything is. ``--minutes`` scales the training steps (the stage that
dominates); the other stages take what they take (about 3 minutes on 2 cores, plus ~8 minutes once
to train the VQ when the shipped one does not fit or ``--train-vq`` asks).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sar_scale.dashboard import die_with_parent
from sar_scale.utils.cpus import usable_cpus
from sar_scale.utils.net import free_port
from sar_scale.utils.procs import stop_process_group

logger = logging.getLogger(__name__)

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"
# The demo VQ trained on the default demo images (scripts/ship_demo_vq.py made it): a first
# `sar-scale demo` starts from it instead of spending ~8 minutes training it, when the VQ key (images,
# config, steps) is the one it was trained for; `--train-vq` trains anyway.
SHIPPED_VQ = Path(__file__).resolve().parent / "assets" / "demo_vq"
SHIPPED_VQ_FILES = ("model.safetensors", "config.json", "train_config.json", "train_summary.json")
DEFAULT_WORKDIR = "runs/demo"
# A fixed prompt list for the sample grid: every color, shape and position at least once.
SAMPLE_PROMPTS: tuple[str, ...] = (
    "a red circle on the left", "a green square on the right", "a blue triangle at the top",
    "a yellow circle at the bottom", "a purple square in the center", "a red triangle on the right",
    "a green circle at the top", "a blue square at the bottom", "a yellow triangle in the center",
    "a purple circle on the left", "a red square at the bottom", "a green triangle in the center",
    "a blue circle on the right", "a yellow square on the left", "a purple triangle at the top",
    "a red circle in the center",
)
STAGES = ("synth", "vq", "text", "prepare", "train", "export", "samples", "eval")


class StageError(RuntimeError):
    pass


@dataclass
class StageResult:
    name: str
    status: str = "pending"  # ok | cached | shipped | failed | skipped
    seconds: float = 0.0
    output: str = ""
    note: str = ""


@dataclass
class Demo:
    """The demo's settings, derived from the CLI flags."""

    workdir: Path
    minutes: float = 10.0
    images: int = 3000
    heldout: int = 256
    corrupt: int = 6
    size: int = 160
    seed: int = 0
    ranks: int = 2
    vq_steps: int | None = None  # None = configs/demo/vq.yaml
    train_steps: list[int] | None = None  # per stage; None = configs/demo/train.yaml scaled by minutes
    eval_steps: list[int] = field(default_factory=lambda: [16, 8, 4])
    eval_orders: list[str] = field(default_factory=lambda: ["random", "raster"])
    eval_ar: bool = True
    eval_samples: int = 4  # images per prompt and plan: 75 prompts x 4 = 300 (+-2.5 points, not +-5 at 75)
    train_vq: bool = False  # train the VQ even when the shipped one fits
    temperature: float | None = 0.3  # the export's default sampling temperature; None = 1.0 (export's own)
    cache_dir: Path = field(default_factory=lambda: Path(os.environ.get(
        "SAR_SCALE_CACHE", Path.home() / ".cache" / "sar-scale")))
    quiet: bool = False
    results: dict[str, StageResult] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ paths
    def p(self, *parts: str) -> Path:
        return self.workdir.joinpath(*parts)

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.p('train', 'mlflow.db').resolve()}"

    # ------------------------------------------------------------------ process plumbing
    def env(self, threads: int | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                    "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
        # One intra-op thread per process unless the user says otherwise: the stages are small, and on
        # a CPU shared with other work two spinning OpenMP threads ran 2-3x slower than one (measured);
        # torchrun gives each training rank one thread anyway.
        # A stage that runs alone and is compute-bound (the VQ) asks for ``threads`` (all cores: 1.7x
        # on 2 idle cores, measured); a user's OMP_NUM_THREADS still wins.
        env.setdefault("OMP_NUM_THREADS", str(threads or 1))
        return env

    def run(self, stage: str, cmd: list[str], label: str | None = None, threads: int | None = None) -> None:
        """Run one command, its output to logs/<stage>.log, with a live one-line progress display."""
        log = self.p("logs", f"{stage}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        label = label or stage
        with open(log, "ab") as f:
            f.write(f"\n$ {' '.join(cmd)}\n".encode())
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env(threads),
                                    start_new_session=True, preexec_fn=die_with_parent)
            t0 = time.monotonic()
            last_print = 0.0
            tty = sys.stdout.isatty()
            try:
                while proc.poll() is None:
                    time.sleep(0.5)
                    el = time.monotonic() - t0
                    if self.quiet:
                        continue
                    if tty:
                        line = f"  {label:<10} {_fmt_s(el):>6}  {_last_line(log)[:90]}"
                        print("\r" + line.ljust(110), end="", flush=True)
                    elif el - last_print >= 30:
                        last_print = el
                        print(f"  {label:<10} {_fmt_s(el):>6}  {_last_line(log)[:90]}", flush=True)
            except KeyboardInterrupt:
                stop_process_group(proc, 30.0)
                raise
            if tty and not self.quiet:
                print("\r" + " " * 110 + "\r", end="", flush=True)
        if proc.returncode != 0:
            tail = "\n".join(_read_tail(log, 25))
            raise StageError(f"{label} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "sar_scale.cli", *args]

    # ------------------------------------------------------------------ stages
    def stage_synth(self) -> str:
        data = self.p("data")
        self.run("synth", self.cli("data", "synth", "--out", str(data / "shapes"), "--n", str(self.images),
                                   "--seed", str(self.seed), "--size", str(self.size), "--corrupt", str(self.corrupt)))
        self.run("synth", self.cli("data", "synth", "--out", str(data / "heldout"), "--n", str(self.heldout),
                                   "--seed", str(self.seed + 1000), "--size", str(self.size)), "synth-val")
        n = sum(1 for _ in (data / "shapes").glob("[0-9]*.png"))
        if n != self.images:
            raise StageError(f"synth wrote {n} images, expected {self.images}")
        self.facts["images"] = n
        self.facts["corrupt_files"] = self.corrupt
        return str(data)

    def vq_key(self) -> str:
        """Hash of what decides the VQ: the demo images (labels.jsonl), the resolved VQ config, the steps.

        Run-speed knobs (``threads``) are left out: they change how fast the VQ trains, not what it is
        meant to be, so changing them does not throw a trained VQ away.
        """
        h = hashlib.sha256()
        h.update(self.p("data", "shapes", "labels.jsonl").read_bytes())
        h.update(json.dumps(self.vq_config(), sort_keys=True).encode())
        h.update(json.dumps({"steps": self.vq_steps, "format": 2}).encode())
        return h.hexdigest()[:16]

    @staticmethod
    def vq_config() -> dict[str, Any]:
        """The resolved configs/demo/vq.yaml without its paths and run-speed knobs."""
        from sar_scale.config import load_config
        from sar_scale.tokenizers.train import VQTrainConfig

        cfg = load_config(VQTrainConfig, REPO_CONFIGS / "vq.yaml", ["data=x", "out=x"])
        return cfg.model_dump(mode="json", exclude={"data", "out", "threads"})

    def vq_record(self) -> dict[str, Any]:
        """What the VQ key covers, readable: recorded beside the shipped VQ (scripts/ship_demo_vq.py)."""
        labels = self.p("data", "shapes", "labels.jsonl").read_bytes()
        return {"key": self.vq_key(), "vq_config": self.vq_config(),
                "steps": self.vq_steps, "images": self.images, "size": self.size, "seed": self.seed,
                "corrupt": self.corrupt, "labels_sha256": hashlib.sha256(labels).hexdigest()}

    def stage_vq(self) -> str:
        out = self.p("vq")
        key = self.vq_key()
        cached = self.cache_dir / "demo_vq" / key
        res = self.results["vq"]
        # the cache holds trained VQs only, so --train-vq always gets one it trained
        shipped = not self.train_vq and shipped_vq_key() == key
        if not (cached / "model.safetensors").is_file() and shipped:
            cached = SHIPPED_VQ
            res.status = "shipped"
        elif not (cached / "model.safetensors").is_file():
            tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            cmd = self.cli("tokenizer", "train", "--config", str(REPO_CONFIGS / "vq.yaml"),
                           "--data", str(self.p("data", "shapes")), "--out", str(tmp))
            if self.vq_steps is not None:
                cmd += ["--steps", str(self.vq_steps)]
            self.run("vq", cmd, threads=usable_cpus())
            tmp.replace(cached) if not cached.exists() else shutil.rmtree(tmp)
        else:
            res.status = "cached"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(cached, out)
        summary = out / "train_summary.json"
        if summary.is_file():
            s = json.loads(summary.read_text())
            self.facts["vq_psnr"] = round(s["heldout"]["psnr"], 2)
            res.note = f"held-out PSNR {s['heldout']['psnr']:.1f} dB, {s['steps']} steps"
        res.note += f" (cache {cached})" if res.status == "cached" else ""
        res.note += " (the shipped demo VQ; --train-vq trains one)" if res.status == "shipped" else ""
        return str(out)

    def stage_text(self) -> str:
        import transformers

        from sar_scale.models import get_config
        from sar_scale.tokenizers.text import build_tiny_text_encoder

        transformers.utils.logging.disable_progress_bar()

        cfg = self.train_config()
        model = get_config(cfg["model"]["name"], **cfg["model"].get("overrides", {}))
        out = self.p("text_encoder")
        shutil.rmtree(out, ignore_errors=True)
        # no CLI command builds one: a tiny encoder is a few lines of transformers, done in-process
        build_tiny_text_encoder(out, kind="t5", width=model.text_dim, layers=2, heads=4,
                                max_length=model.max_text_len, seed=self.seed)
        self.results["text"].note = f"tiny T5 encoder, {model.text_dim}-d, in-process"
        return str(out)

    def stage_prepare(self) -> str:
        cfg = str(REPO_CONFIGS / "data.yaml")
        # the demo owns its workdir: shards made with an older VQ/encoder are rebuilt, not refused
        common = [f"tokenize.vq_path={self.p('vq')}", f"tokenize.text_encoder_path={self.p('text_encoder')}",
                  "output.overwrite=true"]
        self.run("prepare", self.cli("data", "prepare", cfg, f"input.path={self.p('data', 'shapes')}",
                                     f"output.url={self.p('shards')}", *common))
        self.run("prepare", self.cli("data", "prepare", cfg, f"input.path={self.p('data', 'heldout')}",
                                     f"output.url={self.p('shards_heldout')}", "output.name=heldout", *common),
                 "prepare-val")
        man = json.loads(self.p("shards", "manifest.json").read_text())
        self.facts["samples"] = man["samples"]
        self.facts["rejects"] = man.get("rejects", {})
        self.facts["buckets"] = man.get("buckets", {})
        n_rej = sum(self.facts["rejects"].values())
        self.results["prepare"].note = (f"{man['samples']} samples in {len(man['shards'])} shards, {n_rej} rejected "
                                        f"({', '.join(f'{k} {v}' for k, v in self.facts['rejects'].items())})")
        return str(self.p("shards"))

    def train_config(self) -> dict[str, Any]:
        return yaml.safe_load((REPO_CONFIGS / "train.yaml").read_text())

    def train_stages(self) -> list[dict[str, Any]]:
        """The curriculum of configs/demo/train.yaml with steps scaled to ``minutes`` (or given)."""
        stages = [dict(s) for s in self.train_config()["curriculum"]["stages"]]
        if self.train_steps is not None:
            if len(self.train_steps) != len(stages):
                raise ValueError(f"--train-steps needs {len(stages)} values (one per curriculum stage), "
                                 f"got {self.train_steps}")
            steps = self.train_steps
        else:
            # configs/demo/train.yaml is sized for the default 10 minutes; scale linearly
            f = self.minutes / 10.0
            steps = [max(10, round(s["steps"] * f)) for s in stages]
        for s, n in zip(stages, steps):
            s["steps"] = int(n)
            if s.get("warmup") is not None:
                s["warmup"] = min(int(s["warmup"]), max(1, int(n) // 5))
        return stages

    def stage_train(self) -> str:
        # A rerun resumes an interrupted training - unless the shards or the curriculum changed (new
        # VQ, new data, other --minutes): then old checkpoints belong to another run; start over.
        stages = self.train_stages()
        data_hash = json.loads(self.p("shards", "manifest.json").read_text()).get("config_hash", "")
        key = json.dumps({"data": data_hash, "stages": stages, "config": self.train_config()}, sort_keys=True)
        stamp = self.p("train", "demo_inputs.json")
        if self.p("train").exists() and (not stamp.is_file() or stamp.read_text().strip() != key):
            logger.warning("shards or curriculum changed since %s was trained: training from scratch",
                           self.p("train"))
            shutil.rmtree(self.p("train"))
        self.p("train").mkdir(parents=True, exist_ok=True)
        stamp.write_text(key + "\n")
        flow = yaml.safe_dump(stages, default_flow_style=True, width=10_000).strip()
        total = sum(s["steps"] for s in stages)
        warmup = min(int(self.train_config()["optim"].get("warmup_steps", 0)), max(1, stages[0]["steps"] // 5))
        overrides = [f"run_dir={self.p('train')}", f"data.url={self.p('shards')}",
                     f"data.text_encoder={self.p('text_encoder')}", f"mlflow.vq_path={self.p('vq')}",
                     f"curriculum.stages={flow}", f"optim.warmup_steps={warmup}",
                     f"checkpoint.every_steps={max(50, total // 4)}"]
        cfg = str(REPO_CONFIGS / "train.yaml")
        if self.ranks > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={self.ranks}",
                   "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "sar_scale.cli", "train",
                   cfg, *overrides]
        else:
            cmd = self.cli("train", cfg, *overrides)
        self.run("train", cmd)
        metrics = [json.loads(line) for line in self.p("train", "metrics.jsonl").read_text().splitlines() if line.strip()]
        losses = [m for m in metrics if "loss" in m]
        if losses:
            self.facts["first_loss"], self.facts["final_loss"] = losses[0]["loss"], losses[-1]["loss"]
        self.facts["train_steps"] = [s["steps"] for s in stages]
        self.facts["resolutions"] = [s["resolution"] for s in stages]
        run_id_file = self.p("train", "mlflow_run_id")
        self.facts["mlflow_run_id"] = run_id_file.read_text().strip() if run_id_file.is_file() else None
        self.results["train"].note = (f"{'+'.join(map(str, self.facts['train_steps']))} steps at "
                                      f"{'/'.join(map(str, self.facts['resolutions']))} px on {self.ranks} ranks; "
                                      f"loss {self.facts.get('first_loss', float('nan')):.3f} -> "
                                      f"{self.facts.get('final_loss', float('nan')):.3f}")
        return str(self.p("train"))

    def stage_export(self) -> str:
        out = self.p("model")
        self.run("export", self.cli("export", str(self.p("train")), str(out), "--overwrite",
                                    *(["--ema"] if self.train_config().get("ema", {}).get("enabled") else []),
                                    *self.sampling_flags()))
        cfg = json.loads((out / "config.json").read_text())
        self.results["export"].note = (f"{cfg['weights']['num_parameters'] / 1e6:.1f}M params"
                                       f"{' (EMA)' if cfg['weights'].get('ema') else ''}, default plan "
                                       f"{cfg['sampling']['order']}-{cfg['sampling']['num_sets']}-"
                                       f"{cfg['sampling']['intervals']} at temperature {cfg['sampling']['temperature']}")
        return str(out)

    def stage_samples(self) -> str:
        prompts = self.p("samples", "prompts.txt")
        prompts.parent.mkdir(parents=True, exist_ok=True)
        prompts.write_text("\n".join(SAMPLE_PROMPTS) + "\n")
        self.run("samples", self.cli("generate", "--model", str(self.p("model")), "--prompts-file", str(prompts),
                                     "--out", str(self.p("samples")), "--seed", str(self.seed),
                                     "--batch-size", "16"))
        grid = self.p("samples", "grid.png")
        if not grid.is_file():
            raise StageError(f"generate wrote no {grid}")
        self._log_to_mlflow(grid, "demo")
        return str(grid)

    def stage_eval(self) -> str:
        cmd = self.cli("eval", "--model", str(self.p("model")), "--suite", "shapes", "nll",
                       "--shards", str(self.p("shards_heldout")), "--out", str(self.p("eval")),
                       "--mlflow-uri", self.tracking_uri, "--seed", str(self.seed),
                       "--steps", *map(str, self.eval_steps), "--orders", *self.eval_orders,
                       "--samples-per-prompt", str(self.eval_samples))
        if not self.eval_ar:
            cmd.append("--no-ar")
        if self.quiet:
            cmd.append("--quiet")
        self.run("eval", cmd)
        res = json.loads(self.p("eval", "results.json").read_text())
        shapes = res["shapes"]
        default = next(p for p in shapes["plans"] if p["plan"] == shapes["default_plan"])
        self.facts["eval"] = {"default_plan": shapes["default_plan"], "resolution": shapes["resolution"],
                              "images": default["n"],
                              "plans": {p["plan"]: {k: p[f"acc_{k}"] for k in ("color", "shape", "position", "all")}
                                        for p in shapes["plans"]},
                              "nll": {p["plan"]: p["nll"] for p in res["nll"]["plans"]},
                              "settings": shapes.get("settings", {})}
        self.results["eval"].note = (f"all-three accuracy {100 * default['acc_all']:.1f}% at the default plan "
                                     f"{shapes['default_plan']} ({shapes['resolution']} px)")
        return str(self.p("eval"))

    def sampling_flags(self) -> list[str]:
        """Export options: the release carries the sampling settings it is evaluated with as its defaults,
        so samples, eval and a user's `sar-scale generate --model runs/demo/model` all sample alike."""
        return [] if self.temperature is None else ["--sampling", f"temperature={self.temperature}"]

    def _log_to_mlflow(self, path: Path, artifact_path: str) -> None:
        run_id = self.facts.get("mlflow_run_id")
        if not run_id:
            return
        from mlflow.tracking import MlflowClient

        MlflowClient(self.tracking_uri).log_artifact(run_id, str(path), artifact_path)

    # ------------------------------------------------------------------ driver
    def run_all(self, stop_after: str | None = None) -> int:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.results = {s: StageResult(s) for s in STAGES}
        t_all = time.monotonic()
        steps = [s["steps"] for s in self.train_stages()]
        print(f"sar-scale demo -> {self.workdir} ({self.images} images, {self.ranks} ranks, training "
              f"{'+'.join(map(str, steps))} steps{'' if self.train_steps else f' (--minutes {self.minutes:g})'})",
              flush=True)
        failed = None
        for i, name in enumerate(STAGES, 1):
            res = self.results[name]
            print(f"[{i}/{len(STAGES)}] {name} ...", flush=True)
            t0 = time.monotonic()
            try:
                res.output = getattr(self, f"stage_{name}")()
                res.status = res.status if res.status in ("cached", "shipped") else "ok"
            except (StageError, ValueError, FileNotFoundError, KeyError, subprocess.SubprocessError) as e:
                res.status, res.note = "failed", str(e).splitlines()[0]
                failed = (name, e)
            res.seconds = round(time.monotonic() - t0, 1)
            print(f"[{i}/{len(STAGES)}] {name} {res.status} in {_fmt_s(res.seconds)}"
                  + (f": {res.note}" if res.note else ""), flush=True)
            if failed or name == stop_after:
                break
        for r in self.results.values():
            if r.status == "pending":
                r.status = "skipped"
        self.facts["total_seconds"] = round(time.monotonic() - t_all, 1)
        summary = self.summary()
        print(summary)
        (self.p("summary.txt")).write_text(summary + "\n")
        (self.p("summary.json")).write_text(json.dumps(
            {"stages": {k: v.__dict__ for k, v in self.results.items()}, "facts": self.facts}, indent=2) + "\n")
        if failed:
            print(f"\nsar-scale demo: stage '{failed[0]}' failed:\n{failed[1]}", file=sys.stderr)
            return 1
        return 0

    def summary(self) -> str:
        lines = ["", "=" * 100, f"sar-scale demo summary ({_fmt_s(self.facts.get('total_seconds', 0))} total)", "",
                 f"{'stage':<9}{'status':<8}{'time':>8}  output / notes"]
        for r in self.results.values():
            lines.append(f"{r.name:<9}{r.status:<8}{_fmt_s(r.seconds):>8}  {r.output}")
            if r.note:
                lines.append(f"{'':<27}{r.note}")
        ev = self.facts.get("eval")
        if ev:
            lines += ["", f"shapes accuracy at {ev['resolution']} px ({ev.get('images', '?')} images per plan = 75 prompts x "
                      f"{self.eval_samples}; detector: color/shape/position){_settings_text(ev.get('settings'))}:",
                      f"  {'plan':<20}{'color':>7}{'shape':>7}{'pos':>7}{'all-3':>7}   NLL nats/token"]
            for plan, a in ev["plans"].items():
                mark = " <- default" if plan == ev["default_plan"] else ""
                nll = ev["nll"].get(plan)
                lines.append(f"  {plan:<20}" + "".join(f"{100 * a[k]:>6.1f}%" for k in ("color", "shape", "position", "all"))
                             + (f"   {nll:.3f}" if nll is not None else "") + mark)
        if self.results["train"].status == "ok":
            lines += ["", f"MLflow:  {self.tracking_uri} (run {self.facts.get('mlflow_run_id')})",
                      f"         sar-scale dashboard --workdir {self.workdir}"]
        if self.results["samples"].status == "ok":
            lines.append(f"samples: {self.results['samples'].output}")
        if self.results["export"].status == "ok":
            lines.append(f"model:   sar-scale generate --model {self.p('model')} --prompt 'a blue circle at the top' "
                         f"--out samples/")
        lines.append(f"logs:    {self.p('logs')}/<stage>.log")
        return "\n".join(lines)


def _settings_text(s: dict | None) -> str:
    """The sampling settings an evaluation used (the export's defaults unless overridden)."""
    if not s:
        return ""
    return (f"; sampled at cfg {s['cfg_scale']} ({s['cfg_schedule']}), temperature {s['temperature']}, "
            f"top-k {s['top_k']}, top-p {s['top_p']}")


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _read_tail(path: Path, n: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    parts = [p.strip() for chunk in text.split("\n") for p in chunk.split("\r")]
    return [p for p in parts if p][-n:]


def _last_line(path: Path) -> str:
    tail = _read_tail(path, 1)
    return tail[0] if tail else ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sar-scale demo", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
        epilog="Afterwards: `sar-scale dashboard --workdir WORKDIR` shows the run in MLflow.\n"
               "CI smoke form: --images 240 --heldout 40 --vq-steps 30 --train-steps 30 20 --eval-steps 4 "
               "--eval-orders random --no-eval-ar")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"where everything goes (default {DEFAULT_WORKDIR})")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="training budget knob: steps scale linearly with it (default 10 -> the configs' steps)")
    p.add_argument("--images", type=int, default=3000, help="synthetic training images (default 3000)")
    p.add_argument("--heldout", type=int, default=256, help="held-out images for the NLL (default 256)")
    p.add_argument("--corrupt", type=int, default=6, help="deliberately broken input files (default 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks (torchrun processes, default 2)")
    p.add_argument("--vq-steps", type=int, help="VQ training steps (default: configs/demo/vq.yaml)")
    p.add_argument("--train-vq", action="store_true",
                   help="train the VQ (~8 min on 2 cores) even where the shipped demo VQ fits (default images, "
                        "config and steps)")
    p.add_argument("--train-steps", type=int, nargs="+", metavar="N",
                   help="steps per curriculum stage, overriding --minutes")
    p.add_argument("--eval-steps", type=int, nargs="+", default=[16, 8, 4], help="SAR step counts to evaluate")
    p.add_argument("--eval-orders", nargs="+", default=["random", "raster"], help="orders to evaluate")
    p.add_argument("--no-eval-ar", action="store_true", help="skip the AR plan in the evaluation")
    p.add_argument("--eval-samples", type=int, default=4,
                   help="shapes images per prompt and plan (default 4: 75 prompts -> 300 images per plan)")
    p.add_argument("--temperature", type=float, default=0.3,
                   help="default sampling temperature of the exported model, so of the sample grid, the evaluation "
                        "and `sar-scale generate` on it (default 0.3; on a demo "
                        "model 0.1/0.3/0.5 gave 92.3/91.7/92.7%% all-three over 300 images, an earlier, weaker one "
                        "60%% at 0.3 vs 54%% at 0.7); a negative value uses the export's default, 1.0")
    p.add_argument("--fresh", action="store_true", help="delete WORKDIR first (default: reuse it; training resumes)")
    p.add_argument("--stop-after", choices=STAGES, help="stop after this stage")
    p.add_argument("--quiet", action="store_true", help="no live progress lines")
    return p


def shipped_vq_key() -> str | None:
    """The VQ key the shipped demo VQ was trained for; None when the package carries none."""
    rec = SHIPPED_VQ / "shipped.json"
    if not (rec.is_file() and all((SHIPPED_VQ / n).is_file() for n in SHIPPED_VQ_FILES)):
        return None
    return json.loads(rec.read_text())["key"]


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    bad = [(n, v) for n, v in (("--images", a.images), ("--heldout", a.heldout), ("--ranks", a.ranks),
                               ("--minutes", a.minutes), ("--eval-samples", a.eval_samples)) if v <= 0]
    if bad or a.corrupt < 0:
        print(f"sar-scale demo: {bad[0][0] if bad else '--corrupt'} must be positive", file=sys.stderr)
        return 2
    work = Path(a.workdir)
    if a.fresh and work.exists():
        shutil.rmtree(work)
    demo = Demo(work, minutes=a.minutes, images=a.images, heldout=a.heldout, corrupt=a.corrupt, seed=a.seed,
                ranks=a.ranks, vq_steps=a.vq_steps, train_steps=a.train_steps, eval_steps=a.eval_steps,
                eval_orders=a.eval_orders, eval_ar=not a.no_eval_ar, eval_samples=a.eval_samples, quiet=a.quiet, train_vq=a.train_vq,
                temperature=None if a.temperature < 0 else a.temperature)
    try:
        demo.train_stages()  # validate --train-steps before any work
    except ValueError as e:
        print(f"sar-scale demo: {e}", file=sys.stderr)
        return 2
    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # stop the running stage (its own session) on SIGTERM/SIGHUP too

    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python keeps it ignored
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    try:
        return demo.run_all(a.stop_after)
    except KeyboardInterrupt:
        print("\nsar-scale demo: interrupted", file=sys.stderr)
        return 130
