"""The SAR trainer: DeepSpeed ZeRO engine per curriculum stage, exact resume, MLflow on rank 0.

One optimizer step = one global batch of ``grad_accum x world`` micro-batches ("slots"), all of one
bucket. Randomness that shapes a step (the SetPlan drawn, condition dropout, any dropout in the
model) is seeded from (seed, stage, step, slot), so a resumed run repeats it exactly, and so does a
run on another world size with the same global batch (2 ranks x 2 micro-batches = 1 rank x 4).
Resume planning is :func:`sar_scale.training.resume.plan_resume`; a resume on another world size
reshards the optimizer through a DeepSpeed universal checkpoint.

Stage switch (Lumina-style): the stage-end checkpoint is written, a fresh model is loaded with its
consolidated fp32 weights, and a new engine/optimizer/schedule starts (``optimizer_state: keep``
restores AdamW moments from the checkpoint instead). Resume lands in the right stage at the right
step: inside a stage everything (weights, optimizer, schedule, data position, RNG, EMA) is restored.
Shape legend: B samples per rank, N tokens, L text tokens, D text width, V vocabulary.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sar_scale.checkpoint.lease import RunDirBusy, RunLease
from sar_scale.checkpoint.manager import (
    EMA_FILE,
    CheckpointManager,
    read_rng,
    read_train_state,
    set_rng_state,
)
from sar_scale.checkpoint.safe_load import restricted_unpickling
from sar_scale.config import ConfigError
from sar_scale.data.loader import DataPosition, DatasetIndex, StageStream
from sar_scale.distributed import comm, faults
from sar_scale.distributed.ds_config import deepspeed_config, resolve_precision
from sar_scale.distributed.env import set_cpu_threads
from sar_scale.distributed.health import RankStatus, diagnose_peers
from sar_scale.distributed.init import destroy_distributed, init_distributed, resolve_device
from sar_scale.distributed.lifeline import die_with_parent
from sar_scale.training.config import OptimSection, TrainConfig
from sar_scale.training.resume import StageShape, plan_resume
from sar_scale.training.tracking import Tracker, dashboard_key
from sar_scale.utils.redact import collect_secret_values, install_log_filter, redact_obj

logger = logging.getLogger(__name__)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SeedSequence hashing: nearby inputs give unrelated streams)."""
    import numpy as np

    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


@dataclass
class TrainResult:
    global_step: int
    last_loss: float | None
    run_dir: Path
    mlflow_run_id: str | None
    last_checkpoint: Path | None
    rank: int = 0


def default_run_name(cfg: TrainConfig) -> str:
    """``<run folder>: <model> <recipe> <stages>``, e.g. ``train: demo random-16-cosine s32+s64`` (not
    MLflow's random names): what a run list needs to tell runs apart."""
    p = cfg.plan

    def pick(weights: dict[str, float]) -> str:
        return "+".join(k for k, w in weights.items() if w > 0)

    ks = "+".join(str(k) for k in p.num_sets)
    recipe = f"{pick(p.orders)}-ar" if set(p.intervals) == {"ar"} else f"{pick(p.orders)}-{ks}-{pick(p.intervals)}"
    stages = "+".join(s.name for s in cfg.curriculum.stages)
    return f"{Path(cfg.run_dir).name}: {cfg.model.name} {recipe} {stages}"


def build_adamw(params, optim: OptimSection, lr: float) -> torch.optim.AdamW:
    """The training optimizer (``optim.implementation``; auto = fused).

    Under ZeRO the optimizer steps over one flat fp32 partition per group; the fused kernel does that in one
    pass where the for-loop kernel makes several full-size temporaries (measured on the CPU: ZeRO-1's
    overhead over a plain loop +7% with the for-loop kernel, +3% fused; benchmarks/bench_train.py).
    """
    impl = optim.implementation
    kw = {"fused": True} if impl in ("auto", "fused") else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(params, lr=lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                             **kw)


@dataclass
class _StepRecord:
    """What a training step leaves for ``finish`` (its metrics are read one step later)."""

    global_step: int
    step_in_stage: int
    lr: float
    t0: float
    wait: float
    buckets: list[str]
    micro_steps: int
    grad_norm: Any  # a float, a 0-d tensor (read in finish) or None
    sums: comm.PendingSum


class Trainer:
    """Runs a whole :class:`TrainConfig` on this process's rank. Construct and call :meth:`run`."""

    def __init__(self, cfg: TrainConfig, resume: str = "auto", ds_override: dict[str, Any] | None = None):
        if resume not in ("auto", "none") and not Path(resume).exists():
            raise ConfigError(f"--resume {resume!r}: use auto, none or an existing checkpoint folder")
        self.cfg = cfg
        self.resume = resume
        self.ds_override = ds_override
        self.run_dir = Path(cfg.run_dir)
        self.lease: RunLease | None = None
        self.secrets = collect_secret_values(cfg.model_dump()) + collect_secret_values(ds_override or {})

    # ------------------------------------------------------------------ setup helpers
    def _setup_logging(self) -> None:
        log_dir = self.run_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        root = logging.getLogger()
        fh = logging.FileHandler(log_dir / f"rank{self.denv.rank}.log")
        fh.setFormatter(logging.Formatter(f"%(asctime)s rank{self.denv.rank} %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)
        if not root.level or root.level > logging.INFO:
            root.setLevel(logging.INFO)
        if self.denv.rank != 0:  # one console voice; other ranks still log everything to their file
            for h in root.handlers:
                if h is not fh and isinstance(h, logging.StreamHandler):
                    h.setLevel(logging.WARNING)
        self._log_handler = fh
        install_log_filter(self.secrets)
        for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
            logging.getLogger(noisy).setLevel(logging.WARNING)

    def _resolved_config(self) -> dict[str, Any]:
        return redact_obj(self.cfg.model_dump(mode="json"), self.secrets)

    def _cond_mode(self, index_text_features: bool) -> str:
        mode = self.cfg.data.cond
        if mode == "auto":
            if self.model_cfg.cond == "class":
                return "class"
            return "text_features" if index_text_features else "text_encoder"
        if (mode == "class") != (self.model_cfg.cond == "class"):
            raise ConfigError(f"data.cond={mode} does not fit model cond={self.model_cfg.cond!r} "
                              f"(model.name={self.cfg.model.name})")
        return mode

    def _build_model(self, stage: int):
        """The FMT for curriculum ``stage``: the model config plus the stage's RoPE settings (no weights
        depend on them, so a stage can change them and still load the previous stage's weights)."""
        from sar_scale.models import build_model

        st = self.cfg.curriculum.stages[stage]
        over = dict(self.cfg.model.overrides)
        if st.rope_scaling is not None:
            over["rope_scaling"] = st.rope_scaling
        if st.rope_train_grid is not None:
            over["rope_train_grid"] = st.rope_train_grid
        torch.manual_seed(self.cfg.seed)  # identical init on every rank (ZeRO-3 partitions its own copy)
        model = build_model(self.cfg.model.name, **over)
        if self.cfg.model.activation_checkpointing:
            model.enable_activation_checkpointing()
        if self.cfg.model.compile:
            model.compile_blocks()
        return model

    def _param_groups(self, model) -> list[dict[str, Any]]:
        decay, no_decay = [], []
        for _, p in model.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim >= 2 or self.cfg.optim.decay_1d else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.optim.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def _scheduler(self, optimizer, stage: int):
        from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

        warm = self.cfg.stage_warmup(stage)
        total = self.cfg.curriculum.stages[stage].steps
        if self.cfg.stage_schedule(stage) == "cosine":
            return get_cosine_schedule_with_warmup(optimizer, warm, max(total, warm + 1))
        return get_constant_schedule_with_warmup(optimizer, warm)

    # ------------------------------------------------------------------ weights
    @staticmethod
    def load_consolidated(ckpt: Path) -> dict[str, torch.Tensor]:
        """Full fp32 weights of a (verified) checkpoint, any ZeRO stage, for a new stage's model
        (checkpoint/consolidate.py: never unpickles code)."""
        from sar_scale.checkpoint.consolidate import consolidated_state

        kind = "zero" if int(read_train_state(ckpt).get("zero_stage", 0)) > 0 else "stage0"
        return {k: v.float() for k, v in consolidated_state(ckpt, kind, lazy=False).items()}

    # ------------------------------------------------------------------ main
    def run(self) -> TrainResult:
        from sar_scale.distributed.env import get_dist_env

        cfg = self.cfg
        self.denv = get_dist_env()
        if self.denv.launcher != "none":
            die_with_parent()  # no orphan ranks training on when their launcher is killed
        set_cpu_threads(self.denv)
        self.denv = init_distributed(cfg.deepspeed.backend, cfg.device, cfg.deepspeed.timeout_s)
        try:
            self.lease = self._acquire_lease()  # before anything is written to the run directory
        except BaseException:
            destroy_distributed()
            raise
        self._setup_logging()  # every rank logs to RUN_DIR/logs/rank<r>.log from here on
        d = self.denv  # init_distributed's own line came before this rank's log file existed (lease first)
        logger.info("rank %d/%d (local %d/%d, node %d) via %s; logging to %s", d.rank, d.world_size,
                    d.local_rank, d.local_world_size, d.node_rank, d.launcher, self._log_handler.baseFilename)
        self.device = torch.device(resolve_device(cfg.device))
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.precision = resolve_precision(cfg.deepspeed.precision, self.device.type)
        self.status = RankStatus(self.run_dir, self.denv)
        self.status.write("starting", 0, force=True)
        self.tracker: Tracker | None = None
        try:
            result = self._run()
            self.status.write("finished", result.global_step, force=True)
        except BaseException as e:
            peers = diagnose_peers(self.run_dir, self.denv.world_size, self.denv.rank)
            msg = f"{type(e).__name__}: {e}"[:2000]
            self.status.write("failed", getattr(self, "global_step", 0), force=True, error=msg, peers=peers)
            logger.error("rank %d failed: %s%s", self.denv.rank, msg, f" | peers: {peers}" if peers else "")
            if self.tracker is not None:
                try:
                    self.tracker.set_tags({"failure": msg[:500], "failure.peers": peers[:500]})
                    self.tracker.end("FAILED")
                except Exception:  # noqa: BLE001 - best effort while failing
                    pass
            raise
        finally:
            if self.lease is not None:
                self.lease.release()
            destroy_distributed()
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
        return result

    def _acquire_lease(self) -> RunLease | None:
        """Collective: rank 0 takes the run directory's lease; every rank raises :class:`RunDirBusy` if
        another live job holds it (nothing has been written then)."""
        lease, err = None, ""
        if self.denv.rank == 0:
            import functools

            from sar_scale.data.storage import open_storage

            url = self.cfg.checkpoint.mirror_url
            mirror = functools.partial(open_storage, url) if url else None  # opened in the lease's thread
            try:
                # the mirror's lease is taken in the background (object-store retries must not hold the
                # other ranks in a collective) and checked before the first checkpoint is written
                lease = RunLease(self.run_dir, mirror, self.cfg.checkpoint.lease_stale_s).acquire(
                    mirror_in_background=True)
            except RunDirBusy as e:
                err = str(e)
        err = comm.broadcast_object(err)
        if err:
            raise RunDirBusy(err)
        return lease

    def _run(self) -> TrainResult:
        from sar_scale.models import get_config

        cfg, denv = self.cfg, self.denv
        self.model_cfg = get_config(cfg.model.name, **cfg.model.overrides)
        ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self.ckpt = CheckpointManager(ckpt_root, cfg.checkpoint.keep_last, cfg.checkpoint.keep_stage_ends,
                                      cfg.checkpoint.mirror_url)
        if denv.rank == 0:
            dump_config_redacted(self._resolved_config(), self.run_dir / "config.yaml")
        resume_path = self.ckpt.find_resume(self.resume)
        state: dict[str, Any] | None = None
        if resume_path is not None:
            state = read_train_state(resume_path)
            self.ckpt.retire_after(int(state["global_step"]))
            logger.info("resuming from %s (global step %d, stage %s)", resume_path, state["global_step"],
                        state.get("stage_name"))
        elif self.resume == "auto" and denv.rank == 0:
            logger.info("no checkpoint to resume from under %s: starting fresh", ckpt_root)

        # MLflow: rank 0 only, same run across resumes
        self.tracker = Tracker(denv.rank == 0 and cfg.mlflow.enabled, self.run_dir, cfg.mlflow.tracking_uri,
                               cfg.mlflow.experiment, cfg.mlflow.run_name or default_run_name(cfg),
                               cfg.mlflow.system_metrics)
        run_id = self.tracker.start((state or {}).get("mlflow_run_id"), self._resolved_config(),
                                    tags={"world_size": denv.world_size, "launcher": denv.launcher,
                                          "zero_stage": cfg.deepspeed.zero_stage, "precision": self.precision,
                                          "device": self.device.type, "run_dir": str(self.run_dir.resolve())})
        self.mlflow_run_id = comm.broadcast_object(run_id)

        # where to start: a pure function of the checkpoint's state and this job's shape
        stages = cfg.curriculum.stages
        plan = plan_resume(state, str(resume_path) if resume_path is not None else None, denv.world_size,
                           [StageShape(s.steps, s.grad_accum, s.optimizer_state) for s in stages],
                           cfg.deepspeed.zero_stage, cfg.checkpoint.allow_world_size_change,
                           cfg.checkpoint.elastic_grad_accum)
        if denv.rank == 0:
            for note in plan.notes:
                logger.warning(note)
        self.global_step = plan.global_step
        self.last_loss: float | None = None
        last_ckpt: Path | None = resume_path
        init_from = Path(plan.init_from) if plan.init_from else None
        for si in range(plan.start_stage, len(stages)):
            first = si == plan.start_stage
            restore = plan.optimizer if first else ("same_world" if stages[si].optimizer_state == "keep"
                                                    else "none")
            last_ckpt = self._run_stage(
                si, plan.start_step if first else 0,
                plan.position if first else DataPosition(0, 0, stages[si].grad_accum * denv.world_size),
                init_from, Path(plan.resume_from) if first and plan.resume_from else None,
                plan.grad_accum if first else stages[si].grad_accum, restore) or last_ckpt
            init_from = last_ckpt
        self.ckpt.close()
        if self.tracker is not None:
            self.tracker.end("FINISHED")
        comm.barrier()
        return TrainResult(self.global_step, self.last_loss, self.run_dir, self.mlflow_run_id, last_ckpt, denv.rank)

    # ------------------------------------------------------------------ one stage
    def _run_stage(self, si: int, start_step: int, position: DataPosition, init_from: Path | None,
                   resume_from: Path | None, grad_accum: int, restore: str) -> Path | None:
        """Train stage ``si`` from ``start_step``. ``restore`` (from :func:`plan_resume`): how the optimizer
        state of ``resume_from`` (or of ``init_from`` with optimizer_state=keep) comes back - ``none``,
        ``same_world`` (DeepSpeed's own files) or ``reshard`` (a universal checkpoint)."""
        import deepspeed

        cfg, denv = self.cfg, self.denv
        st = cfg.curriculum.stages[si]
        if start_step >= st.steps:
            return None
        url = cfg.stage_data_url(si)
        index = DatasetIndex(url)  # the manifest only: O(shards)
        stream = StageStream(
            url, st.resolution, denv.rank, denv.world_size, cfg.seed, si,
            cond=self._cond_mode(index.text_features), micro_batch=st.micro_batch,
            tokens_per_batch=st.tokens_per_batch, position=position, class_field=cfg.data.class_field,
            max_text_len=self.model_cfg.max_text_len, vocab_size=self.model_cfg.vocab_size,
            num_workers=cfg.data.num_workers, prefetch_factor=cfg.data.prefetch_factor,
            last_batch=cfg.data.last_batch, index=index, grad_accum=grad_accum, window=cfg.data.window,
            prefetch_shards=cfg.data.prefetch_shards, piece_bytes=cfg.data.piece_bytes, cache_dir=cfg.data.cache_dir,
            cache_bytes=cfg.data.cache_bytes)
        pieces, held = stream.held_bound()
        logger.info("data: %d shards of %d aspect buckets at %d px; a rank holds at most %d pieces (~%.2f GiB: "
                    "lanes x 2 x data.window %d + data.prefetch_shards %d, pieces <= data.piece_bytes)",
                    len(stream.shards), len({s.grid for s in stream.shards}), st.resolution, pieces, held / 2**30,
                    cfg.data.window, cfg.data.prefetch_shards)
        self.text_encoder = None
        if stream.cond == "text_encoder":
            from sar_scale.tokenizers.text import TextEncoder

            if not cfg.data.text_encoder:
                raise ConfigError("data.text_encoder: a local TextEncoder directory is needed "
                                  "(the shards have no text features)")
            self.text_encoder = TextEncoder.from_pretrained(cfg.data.text_encoder,
                                                            max_length=self.model_cfg.max_text_len)
            self.text_encoder.to(self.device).eval()
            if self.text_encoder.dim != self.model_cfg.text_dim:
                raise ConfigError(f"data.text_encoder has width {self.text_encoder.dim}, model text_dim is "
                                  f"{self.model_cfg.text_dim}")

        # model (+ previous stage's weights), optimizer, schedule, engine
        model = self._build_model(si)
        src = resume_from or (init_from if restore != "none" else None)  # optimizer state comes from here
        if init_from is not None and src is None:
            model.load_state_dict(self.load_consolidated(init_from))
            logger.info("stage %s starts from the weights of %s", st.name, init_from)
        mb = stream.nominal_micro_batch()
        ds_cfg = deepspeed_config(cfg, denv.world_size, si, mb, self.device.type, self.ds_override,
                                  grad_accum=grad_accum)
        load_dir = src.parent if src is not None else None
        if src is not None and restore == "reshard" and cfg.deepspeed.zero_stage > 0:
            # ZeRO partitions are per rank: DeepSpeed's universal format reshards them to this world
            load_dir = self.ckpt.universal(src)
            ds_cfg["checkpoint"] = {**ds_cfg.get("checkpoint", {}), "load_universal": True}
        if denv.rank == 0:
            (self.run_dir / f"ds_config.{st.name}.json").write_text(
                json.dumps(redact_obj(ds_cfg, self.secrets), indent=1))
        groups = self._param_groups(model)
        if cfg.deepspeed.offload_optimizer != "none":
            engine, optimizer, _, sched = deepspeed.initialize(
                model=model, model_parameters=groups, config=ds_cfg,
                lr_scheduler=lambda opt: self._scheduler(opt, si))
        else:
            optimizer = build_adamw(groups, cfg.optim, cfg.stage_lr(si))
            sched = self._scheduler(optimizer, si)
            engine, optimizer, _, sched = deepspeed.initialize(model=model, optimizer=optimizer,
                                                               lr_scheduler=sched, config=ds_cfg)
        ema = None
        if cfg.ema.enabled:
            from sar_scale.training.ema import EMA

            ema = EMA(engine.module, cfg.ema.decay)

        if src is not None:
            assert load_dir is not None
            with restricted_unpickling():  # a tampered checkpoint is refused, never executed
                engine.load_checkpoint(str(load_dir), tag=src.name, load_optimizer_states=True,
                                       load_lr_scheduler_states=resume_from is not None)
            if resume_from is None:  # kept moments, fresh schedule: re-apply this stage's lr
                for g, lr in zip(optimizer.param_groups, sched.get_last_lr()):
                    g["lr"] = lr
            # per-rank RNG states only mean something on the same world (every step reseeds anyway)
            rng = read_rng(src, denv.rank) if resume_from is not None and restore == "same_world" else None
            if rng is not None:
                set_rng_state(rng)
        ema_src = resume_from or init_from
        if ema is not None and ema_src is not None and (ema_src / EMA_FILE).is_file():
            from safetensors.torch import load_file

            ema.load_full_state_dict(load_file(str(ema_src / EMA_FILE)))
        if resume_from is not None:
            logger.info("resumed stage %s at step %d/%d, data epoch %d global batch %d (%d micro-batches of "
                        "which this job does %d per rank)", st.name, start_step, st.steps, position.epoch,
                        position.batch, stream.slots, grad_accum)
        return self._loop(si, engine, optimizer, sched, stream, ema, start_step)

    def _loop(self, si: int, engine, optimizer, sched, stream: StageStream, ema, start_step: int) -> Path | None:
        from tqdm import tqdm

        from sar_scale.models.flops import model_shape, train_flops_per_sample
        from sar_scale.sar import Condition, PlanSampler, set_ar_loss

        cfg, denv = self.cfg, self.denv
        st = cfg.curriculum.stages[si]
        ga = engine.gradient_accumulation_steps()
        sampler = PlanSampler(cfg.plan)
        shape = model_shape(self.model_cfg)  # for the FLOPs behind the MFU metric (same count as `plan`)
        order_file = None
        if cfg.log_data_order:
            (self.run_dir / "data_order").mkdir(parents=True, exist_ok=True)
            order_file = open(self.run_dir / "data_order" / f"rank{denv.rank}.jsonl", "a")  # noqa: SIM115
        metrics_file = open(self.run_dir / "metrics.jsonl", "a") if denv.rank == 0 else None  # noqa: SIM115
        it = iter(stream)
        last_ckpt: Path | None = None
        bar = tqdm(total=st.steps, initial=start_step, desc=f"stage {st.name} ({st.resolution}px)",
                   disable=denv.rank != 0, dynamic_ncols=True)
        engine.train()

        def finish(rec: _StepRecord, t_end: float) -> None:
            """Read a step's summed metrics (started by ``comm.start_sum``), check its loss, log it.

            Called for step k while step k+1's work is already queued (and before any checkpoint), so the
            per-step collective and its device->host read never stall the step that follows. Every rank
            reads the same sums, so a non-finite loss stops all ranks at the same step.
            """
            red = rec.sums.result()
            ga, w = rec.micro_steps, denv.world_size
            step_losses = [x / w for x in red[:ga]]
            loss_v = sum(step_losses) / ga
            if not math.isfinite(loss_v):
                raise FloatingPointError(f"loss is {loss_v} at global step {rec.global_step} (stage {st.name})")
            self.last_loss = loss_v
            dt = t_end - rec.t0
            gn = float(rec.grad_norm) if rec.grad_norm is not None else None
            if order_file is not None:
                order_file.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{rec.lr:.2e}")
            self.status.write("running", rec.global_step)
            if rec.global_step % cfg.log_every == 0 or rec.step_in_stage == st.steps - 1:
                m = {"loss": loss_v, "lr": rec.lr, "grad_norm": gn, "stage": si, "resolution": st.resolution,
                     "step_time_s": dt, "data_wait_s": rec.wait, "tokens_per_s": red[ga] / dt,
                     "samples_per_s": red[ga + 1] / dt, "flops_per_s": red[ga + 2] / dt,
                     f"loss/{st.name}": loss_v}
                if cfg.mlflow.peak_flops:
                    m["mfu"] = red[ga + 2] / dt / (cfg.mlflow.peak_flops * w)
                for bk, lv in zip(rec.buckets, step_losses):
                    m[f"loss/bucket_{bk}"] = lv
                if metrics_file is not None:
                    metrics_file.write(json.dumps({"step": rec.global_step, "stage_name": st.name,
                                                   "step_in_stage": rec.step_in_stage + 1, "buckets": rec.buckets,
                                                   "micro_losses": step_losses, **m}) + "\n")
                    metrics_file.flush()
                if rec.global_step % cfg.mlflow.log_every == 0 or rec.step_in_stage == st.steps - 1:
                    self.tracker.log_metrics({dashboard_key(k): v for k, v in m.items()}, rec.global_step)

        pending: _StepRecord | None = None
        try:
            for step_in_stage in range(start_step, st.steps):
                t0 = time.perf_counter()
                wait = 0.0
                micro_losses, tokens, samples, flops = [], 0, 0, 0.0
                buckets: list[str] = []
                gn0 = None
                lr = float(optimizer.param_groups[0]["lr"])
                for micro in range(ga):
                    tw = time.perf_counter()
                    batch = next(it)
                    wait += time.perf_counter() - tw
                    # seeded by the micro-batch's slot in the global batch, not by (rank, micro): the same
                    # plans, dropout and condition drops for the same samples on any world size
                    seed = mix_seed(cfg.seed, si, step_in_stage, batch["slot"])
                    torch.manual_seed(seed)
                    gen = torch.Generator().manual_seed(seed)
                    tokens_BN = batch["tokens"].to(self.device, non_blocking=True)
                    b, n = tokens_BN.shape
                    cond = self._condition(batch, Condition)
                    cond = cond.dropped(self.model_cfg.cond_dropout, generator=gen)
                    plan = sampler.draw(batch["grid"], b, gen)
                    logits_BNV = engine(tokens_BN, cond, plan)
                    loss = set_ar_loss(logits_BNV, tokens_BN)
                    if faults.poisoned("loss", self.global_step + 1):
                        loss = loss * float("nan")
                    engine.backward(loss)
                    if micro == ga - 1 and cfg.deepspeed.zero_stage == 0:
                        # DeepSpeed records the global grad norm only for its ZeRO/mixed-precision
                        # optimizers; here grads are already all-reduced, so measure before clipping
                        gn0 = torch.nn.utils.get_total_norm(
                            [p.grad for p in engine.module.parameters() if p.grad is not None]).detach()
                    engine.step()
                    micro_losses.append(loss.detach())  # read with the step's other sums, see finish()
                    tokens += b * n
                    samples += b
                    n_cond = 1 if self.model_cfg.cond == "class" else 1 + (cond.text.shape[1] if cond.text is not None else 0)
                    flops += b * train_flops_per_sample(shape, n, n_cond)
                    buckets.append(f"{batch['grid'][0]}x{batch['grid'][1]}")
                    if order_file is not None:
                        order_file.write(json.dumps({"global_step": self.global_step + 1, "stage": si,
                                                     "micro": micro, "epoch": batch["epoch"],
                                                     "batch": batch["batch"], "slot": batch["slot"],
                                                     "keys": batch["keys"], "time": time.time()}) + "\n")
                if ema is not None and (self.global_step + 1) % cfg.ema.every == 0:
                    ema.update()
                self.global_step += 1
                # one collective for the step's metrics (micro losses, tokens, samples, FLOPs), started
                # without waiting; it is read while the next step runs (no host sync per step or micro step)
                counts = torch.tensor([tokens, samples, flops], dtype=torch.float64)
                if micro_losses[0].is_cuda:  # a pinned copy does not make the host wait for the stream
                    counts = counts.pin_memory().to(micro_losses[0].device, non_blocking=True)
                sums = comm.start_sum(torch.cat([torch.stack(micro_losses).to(torch.float64), counts]))
                if pending is not None:
                    finish(pending, t0)  # step time = start to start, the rate a pipelined loop runs at
                gn = engine.get_global_grad_norm() if cfg.deepspeed.zero_stage else gn0
                pending = _StepRecord(self.global_step, step_in_stage, lr, t0, wait, buckets, ga, gn, sums)
                faults.maybe_fire("after_step", self.global_step)
                stage_end = step_in_stage == st.steps - 1
                every = cfg.checkpoint.every_steps
                if stage_end or (every and self.global_step % every == 0):
                    finish(pending, time.perf_counter())  # a checkpoint never holds an unchecked step
                    pending = None
                    last_ckpt = self._save(engine, ema, si, step_in_stage + 1, stream.position, stage_end)
            if pending is not None:
                finish(pending, time.perf_counter())
            bar.close()
            if self.cfg.mlflow.vq_path:
                self._log_samples(engine, stream, si)
        finally:
            bar.close()
            if hasattr(it, "close"):
                it.close()
            if order_file is not None:
                order_file.close()
            if metrics_file is not None:
                metrics_file.close()
        del engine, optimizer, sched
        gc.collect()
        return last_ckpt

    def _condition(self, batch: dict[str, Any], Condition):
        return Condition.from_batch(batch, text_encoder=self.text_encoder, max_text_len=self.model_cfg.max_text_len,
                                    device=self.device,
                                    dtype=torch.bfloat16 if self.precision == "bf16" else torch.float32)

    def _save(self, engine, ema, si: int, step_in_stage: int, position: DataPosition, stage_end: bool) -> Path:
        cfg, denv = self.cfg, self.denv
        st = cfg.curriculum.stages[si]
        train_state = {
            "global_step": self.global_step, "stage": si, "stage_name": st.name,
            "step_in_stage": step_in_stage, "stage_complete": stage_end,
            "data": {**position.as_dict(), "resolution": st.resolution, "world_size": denv.world_size,
                     "seed": cfg.seed},
            "grad_accum": engine.gradient_accumulation_steps(),
            "world_size": denv.world_size, "zero_stage": cfg.deepspeed.zero_stage, "precision": self.precision,
            "mlflow_run_id": self.mlflow_run_id, "last_loss": self.last_loss,
            "config": self._resolved_config(),
            "versions": _versions(),
        }
        lost = ""  # never write checkpoints into a run directory another job took over (collective)
        if self.lease is not None:
            try:
                self.lease.check()
            except RunDirBusy as e:
                lost = str(e)
        lost = comm.broadcast_object(lost)
        if lost:
            raise RunDirBusy(lost)
        ema_sd = ema.full_state_dict() if ema is not None else None
        path = self.ckpt.save(engine, self.global_step, train_state, ema_sd)
        if self.tracker is not None:
            tags = {"checkpoint.latest": str(path.resolve())}
            if cfg.checkpoint.mirror_url:
                tags["checkpoint.mirror"] = cfg.checkpoint.mirror_url
            if stage_end:
                tags[f"checkpoint.stage_end.{st.name}"] = str(path.resolve())
            self.tracker.set_tags(tags)
        return path

    def _log_samples(self, engine, stream: StageStream, si: int) -> None:
        """Sample a small grid with the current weights, decode with the VQ, log it to MLflow (rank 0).

        Under ZeRO-3 the weights are gathered first (collective); sampling itself runs on rank 0.
        """
        from sar_scale.sar import Condition, Recipe, sample

        cfg = self.cfg
        st = cfg.curriculum.stages[si]
        zero3 = cfg.deepspeed.zero_stage == 3
        full_sd = engine._zero3_consolidated_16bit_state_dict() if zero3 else None
        if self.denv.rank == 0:
            from PIL import Image

            from sar_scale.tokenizers.vq import load_vq

            if zero3:
                model = self._build_model(si).to(self.device)
                model.load_state_dict({k: v.float() for k, v in full_sd.items()})
            else:
                model = engine.module
            batch = stream.global_batch(0, 0)  # the whole first global batch, read by rank 0 alone
            k = min(cfg.mlflow.sample_count, len(batch["keys"]))
            batch = _slice_batch(batch, k)
            cond = self._condition(batch, Condition)
            grid = batch["grid"]
            plan = Recipe("random", cfg.mlflow.sample_num_sets, "cosine").build(grid, seed=cfg.seed)
            gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
            tokens_BN = sample(model, cond, plan, cfg_scale=cfg.mlflow.sample_cfg_scale, generator=gen)
            vq = load_vq(cfg.mlflow.vq_path).to(self.device).eval()
            with torch.no_grad():
                img_B3HW = vq.decode(tokens_BN.view(k, grid[0], grid[1]))
            img = ((img_B3HW.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            canvas = Image.new("RGB", (img.shape[2] * k, img.shape[1]))
            for i in range(k):
                canvas.paste(Image.fromarray(img[i]), (i * img.shape[2], 0))
            name = f"samples/{st.name}_step{self.global_step:08d}"
            self.tracker.log_image(canvas, f"{name}.png")
            self.tracker.log_text("\n".join(batch["captions"]), f"{name}.txt")
            logger.info("logged sample grid %s.png (%d images, %dx%d tokens)", name, k, grid[0], grid[1])
        comm.barrier()


def _slice_batch(batch: dict[str, Any], k: int) -> dict[str, Any]:
    out = {}
    for key, v in batch.items():
        out[key] = v[:k] if isinstance(v, (list, torch.Tensor)) else v
    return out


def _versions() -> dict[str, str]:
    import deepspeed

    import sar_scale

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "sar_scale": sar_scale.__version__}


def dump_config_redacted(data: dict[str, Any], path: Path) -> Path:
    """Write an already-redacted resolved config dict as YAML (dump_config takes a model, we have a dict)."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


__all__ = ["TrainResult", "Trainer", "mix_seed"]
