"""Build a self-contained export from a training checkpoint (or from weights in memory).

Order of work, so a failure never leaves something that looks complete: weights (sharded
safetensors) -> ``vq/`` -> ``text_encoder/`` -> verification (reload the files, compare logits with
the checkpoint's weights on a probe batch) -> ``README.md`` -> ``config.json`` last. Without
``config.json`` a directory is not loadable, so an export that failed verification is never used.
Optional afterwards: register in the MLflow model registry, upload to object storage.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import sar_scale
from sar_scale.checkpoint.consolidate import consolidated_state, materialize
from sar_scale.config import load_config
from sar_scale.export.card import model_card
from sar_scale.export.checkpoints import (
    CheckpointSource,
    ExportError,
    ema_state,
    global_step_of,
    model_config_for,
    resolve_checkpoint,
    stage_metrics,
)
from sar_scale.export.config import (
    CONFIG_NAME,
    ExportConfig,
    SamplingDefaults,
    SourceInfo,
    TextEncoderRef,
    Verification,
    VQRef,
    WeightsInfo,
    write_export_config,
)
from sar_scale.export.weights import check_state_dict, save_sharded, torch_dtype
from sar_scale.utils.redact import redact_obj, redact_text

if TYPE_CHECKING:
    from sar_scale.models import FMTConfig
    from sar_scale.sar import Condition, SetPlan
    from sar_scale.tokenizers.text import TextEncoder
    from sar_scale.tokenizers.vq import VQModel

logger = logging.getLogger(__name__)

README = "README.md"


@dataclass
class ExportResult:
    out_dir: Path
    config: ExportConfig
    seconds: float
    registered: dict[str, Any] | None = None
    uploaded: str | None = None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- tokenizer / text encoder


def copy_vq(source: str | Path | VQModel, out_dir: Path, vocab_size: int) -> VQRef:
    """Copy the VQ into ``out_dir`` as safetensors (a LlamaGen ``.pt`` is converted, never re-pickled)."""
    from sar_scale.tokenizers.vq import VQModel, load_vq, save_vq

    vq = source if isinstance(source, VQModel) else load_vq(source)
    if vq.config.codebook_size != vocab_size:
        raise ExportError(f"VQ {source if not isinstance(source, VQModel) else '(given)'} has a codebook of "
                          f"{vq.config.codebook_size}, the model's vocab_size is {vocab_size}: not this model's tokenizer")
    save_vq(vq, out_dir)
    shown = None if isinstance(source, VQModel) else redact_text(str(source))
    return VQRef(path=out_dir.name, downsample=vq.downsample, codebook_size=vq.config.codebook_size, source=shown)


def copy_text_encoder(source: str | Path | TextEncoder, out_dir: Path, text_dim: int, max_length: int
                      ) -> TextEncoderRef:
    """Re-save the text encoder (model weights as safetensors + tokenizer files) into ``out_dir``."""
    from sar_scale.tokenizers.text import TextEncoder

    enc = source if isinstance(source, TextEncoder) else TextEncoder.from_pretrained(source, max_length=max_length)
    if enc.dim != text_dim:
        raise ExportError(f"text encoder {source if not isinstance(source, TextEncoder) else '(given)'} has width "
                          f"{enc.dim}, the model's text_dim is {text_dim}")
    out_dir.mkdir(parents=True, exist_ok=True)
    enc.model.save_pretrained(out_dir, safe_serialization=True)
    enc.tokenizer.save_pretrained(out_dir)
    shown = None if isinstance(source, TextEncoder) else redact_text(str(source))
    return TextEncoderRef(path=out_dir.name, dim=enc.dim, max_length=max_length, padding_side=enc.padding_side,
                          source=shown)


# ----------------------------------------------------------------------------- verification


def probe_batch(fmt: FMTConfig, grid: tuple[int, int], seed: int = 0, batch: int = 2
                ) -> tuple[torch.Tensor, Condition, SetPlan]:
    """Random tokens, condition and a random-order plan: exercises every weight of the model."""
    from sar_scale.sar import Condition, SetPlan

    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    tokens = torch.randint(0, fmt.vocab_size, (batch, n), generator=g)
    if fmt.cond == "class":
        cond = Condition(class_ids=torch.tensor([i % fmt.num_classes for i in range(batch - 1)] + [-1]))
    else:
        length = min(8, fmt.max_text_len)
        mask = torch.ones(batch, length, dtype=torch.bool)
        mask[-1, length // 2:] = False
        cond = Condition(text=torch.randn(batch, length, fmt.text_dim, generator=g), text_mask=mask)
    plan = SetPlan.build(grid, order="random", num_sets=min(4, n), intervals="random", seed=seed,
                         batch_size=batch, generator=g)
    return tokens, cond, plan


def _logits(model: torch.nn.Module, probe: tuple, dtype: torch.dtype) -> torch.Tensor:
    tokens, cond, plan = probe
    if cond.text is not None:
        cond = cond.to("cpu", dtype)
    with torch.no_grad():
        return model(tokens, cond, plan).float()


def verify_export(out_dir: Path, cfg: ExportConfig, reference: dict[str, torch.Tensor], grid: tuple[int, int]
                  ) -> Verification:
    """Reload the written files and compare logits with a model holding ``reference`` (same dtype)."""
    from sar_scale.export.pipeline import load_model
    from sar_scale.models import FullyMaskedTransformer

    fmt = cfg.fmt_config()
    dtype = torch_dtype(cfg.weights.dtype)
    probe = probe_batch(fmt, grid)
    with torch.device("meta"):
        ref = FullyMaskedTransformer(fmt)
    ref.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in reference.items()},
                        strict=True, assign=True)
    ref.eval()
    reloaded = load_model(out_dir, cfg, "cpu", dtype=None)  # the file's own dtype
    got = _logits(reloaded, probe, dtype)
    want = _logits(ref, probe, dtype)
    diff = float((got - want).abs().max())
    vs32 = None
    if dtype != torch.float32:
        with torch.device("meta"):
            ref32 = FullyMaskedTransformer(fmt)
        ref32.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in reference.items()},
                              strict=True, assign=True)
        vs32 = float((got - _logits(ref32.eval(), probe, torch.float32)).abs().max())
    # same weights, same dtype, same CPU kernels: the logits must agree to float rounding at most
    tol = 1e-5 * max(1.0, float(want.abs().max()))
    return Verification(probe={"grid": list(grid), "batch": int(probe[0].shape[0]), "plan": probe[2].name(),
                               "cond": fmt.cond},
                        max_abs_logit_diff=diff, max_abs_logit_diff_vs_fp32=vs32, passed=diff <= tol)


# ----------------------------------------------------------------------------- the export


def write_export(out_dir: str | Path, state: dict[str, Any], fmt: FMTConfig, *, vq: str | Path | VQModel,
                 text_encoder: str | Path | TextEncoder | None = None,
                 dtype: str = "fp32", max_shard_size: int | str = "5GB", ema: bool = False,
                 source: SourceInfo | None = None, resolutions: list[int] | None = None,
                 default_resolution: int | None = None, sampling: SamplingDefaults | None = None,
                 data: list[dict[str, Any]] | None = None, metrics: dict[str, dict[str, float]] | None = None,
                 name: str | None = None, text_max_length: int | None = None) -> ExportConfig:
    """Write an export directory from a (possibly lazy) state dict; raises ExportError if it fails to verify.

    ``vq``: a VQ directory/file or a VQModel; ``text_encoder``: a TextEncoder directory or instance
    (text-conditional models). Used by ``sar-scale export`` and to package weights held in memory.
    """
    from sar_scale.models import FullyMaskedTransformer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).unlink(missing_ok=True)  # not loadable until this export is complete
    with torch.device("meta"):
        meta_model = FullyMaskedTransformer(fmt)
    check_state_dict(meta_model, state, "the checkpoint")
    t0 = time.time()
    files = save_sharded(state, out, torch_dtype(dtype), max_shard_size,
                         metadata={"sar_scale_format": "1", "dtype": dtype})
    logger.info("wrote %s in %.1fs", files if len(files) < 4 else f"{len(files)} shards", time.time() - t0)
    vq_ref = copy_vq(vq, out / "vq", fmt.vocab_size)
    te_ref = None
    if fmt.cond == "text":
        if text_encoder is None:
            raise ExportError("the model is text-conditional: a text encoder is required (--text-encoder DIR)")
        te_ref = copy_text_encoder(text_encoder, out / "text_encoder", fmt.text_dim,
                                   text_max_length or fmt.max_text_len)
    elif (out / "text_encoder").exists():
        shutil.rmtree(out / "text_encoder")
    resolutions = sorted(set(resolutions or []))
    n_params = sum(int(torch.Size(v.shape).numel()) for v in state.values())
    cfg = ExportConfig(
        model=fmt.model_dump(mode="json"), vq=vq_ref, text_encoder=te_ref, resolutions=resolutions,
        default_resolution=default_resolution or (resolutions[-1] if resolutions else None),
        sampling=sampling or SamplingDefaults(),
        weights=WeightsInfo(dtype=dtype, ema=ema, sharded=len(files) > 1, files=files, num_parameters=n_params),
        source=SourceInfo.model_validate(redact_obj((source or SourceInfo(kind="state_dict")).model_dump())),
        sar_scale_version=sar_scale.__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    base = default_resolution or (resolutions[0] if resolutions else 16 * vq_ref.downsample)
    side = max(1, min(16, base // vq_ref.downsample))
    t1 = time.time()
    ver = verify_export(out, cfg, materialize(state), (side, side))
    logger.info("verification: max |logit diff| %.3g (%s) in %.1fs", ver.max_abs_logit_diff,
                "passed" if ver.passed else "FAILED", time.time() - t1)
    cfg.verification = ver
    if not ver.passed:
        raise ExportError(f"verification failed: reloaded logits differ from the checkpoint's by "
                          f"{ver.max_abs_logit_diff:.3g} on the probe batch; {out} was left without {CONFIG_NAME}")
    (out / README).write_text(model_card(cfg, data, metrics, name))
    write_export_config(cfg, out)
    return cfg


def _train_metadata(src: CheckpointSource, fmt: FMTConfig) -> dict[str, Any]:
    """Resolutions, stages, default sampling and data description from the stored training config."""
    tc = redact_obj(src.train_config)
    stages = [{"name": s.get("name"), "resolution": s.get("resolution"), "steps": s.get("steps")}
              for s in (tc.get("curriculum", {}) or {}).get("stages", [])]
    plan = tc.get("plan") or {}
    orders = plan.get("orders") or {"random": 1.0}
    intervals = plan.get("intervals") or {"cosine": 1.0}
    mlf = tc.get("mlflow") or {}
    sampling = SamplingDefaults(
        order=max(orders, key=lambda k: orders[k]),
        num_sets=max(plan.get("num_sets") or [16]),
        intervals="cosine" if intervals.get("cosine", 0) > 0 else max(intervals, key=lambda k: intervals[k]),
        cfg_scale=float(mlf.get("sample_cfg_scale", 1.5)) if fmt.cond_dropout > 0 else 1.0,
        fixed_order_seed=int(plan.get("fixed_order_seed", 0)), subsample_stride=int(plan.get("subsample_stride", 2)))
    state = src.train_state or {}
    source = SourceInfo(checkpoint=src.display, kind=src.kind, global_step=global_step_of(src),
                        zero_stage=state.get("zero_stage"), world_size=state.get("world_size"),
                        precision=state.get("precision"), mlflow_run_id=state.get("mlflow_run_id"),
                        stages=stages, last_loss=state.get("last_loss"))
    return {"stages": stages, "sampling": sampling, "source": source,
            "resolutions": [int(s["resolution"]) for s in stages if s.get("resolution")],
            "default_resolution": int(stages[-1]["resolution"]) if stages and stages[-1].get("resolution") else None}


def _data_info(src: CheckpointSource) -> list[dict[str, Any]]:
    """Per stage: shard URL (redacted) and, when the manifest is readable, sample count."""
    from sar_scale.data import schema
    from sar_scale.data.storage import open_storage

    tc = src.train_config
    out = []
    for st in (tc.get("curriculum", {}) or {}).get("stages", []):
        url = st.get("data_url") or (tc.get("data") or {}).get("url")
        row = {"stage": st.get("name"), "url": redact_text(str(url)) if url else None}
        if url:
            try:
                man = schema.read_dataset_manifest(open_storage(url))
                row.update(samples=man.get("samples"), text_features=man.get("text_features"))
            except Exception as e:  # noqa: BLE001 - the card is still useful without counts
                logger.info("data manifest of stage %s not readable (%s): no sample counts", st.get("name"),
                            redact_text(str(e))[:200])
        out.append(row)
    return out


def _manifest_paths(src: CheckpointSource) -> dict[str, Any]:
    """What `data prepare` recorded in the first stage's manifest (VQ / text encoder paths, whether
    text features were precomputed and at which tokenizer length), if readable."""
    from sar_scale.data import schema
    from sar_scale.data.storage import open_storage

    tc = src.train_config
    stages = (tc.get("curriculum", {}) or {}).get("stages", [])
    url = (stages[0].get("data_url") if stages else None) or (tc.get("data") or {}).get("url")
    if not url:
        return {}
    try:
        man = schema.read_dataset_manifest(open_storage(url))
    except Exception:  # noqa: BLE001 - optional hint only
        return {}
    tok = (man.get("config") or {}).get("tokenize") or {}
    out = {k: v for k, v in (("vq", tok.get("vq_path")), ("text_encoder", tok.get("text_encoder_path")),
                             ("text_max_length", tok.get("text_max_length"))) if v}
    return {**out, "text_features": bool(man.get("text_features"))}


def _text_max_length(src: CheckpointSource, manifest: dict[str, Any], fmt: FMTConfig) -> int:
    """Caption tokens the text encoder saw in training: the model's max_text_len when captions were encoded
    on the fly; the `data prepare` length when features were precomputed (the loader then kept the first
    max_text_len features, as the pipeline does)."""
    mode = (src.train_config.get("data") or {}).get("cond", "auto")
    if mode == "auto":
        mode = "text_features" if manifest.get("text_features") else "text_encoder"
    if mode == "text_features" and manifest.get("text_max_length"):
        return int(manifest["text_max_length"])
    return fmt.max_text_len


def _locate(kind: str, explicit: str | None, candidates: list[tuple[str, str | None]]) -> str:
    if explicit:
        if not Path(explicit).exists():
            raise ExportError(f"--{kind.replace('_', '-')} {explicit}: not found")
        return explicit
    for where, path in candidates:
        if path and Path(path).exists():
            logger.info("%s from %s: %s", kind, where, redact_text(path))
            return path
    tried = ", ".join(f"{w}={redact_text(str(p))}" for w, p in candidates if p) or "nothing recorded"
    raise ExportError(f"cannot find the {kind} for this model (tried {tried}); pass --{kind.replace('_', '-')} DIR")


def export_checkpoint(source: str, out_dir: str | Path, *, ema: bool = False, dtype: str = "fp32",
                      max_shard_size: int | str = "5GB", vq: str | None = None, text_encoder: str | None = None,
                      model_config: str | None = None, trust_checkpoint: bool = False,
                      register: str | None = None, tracking_uri: str | None = None, upload: str | None = None,
                      download_dir: str | Path | None = None, name: str | None = None,
                      sampling: list[str] | None = None) -> ExportResult:
    """Consolidate ``source`` (run folder, checkpoint root/folder, or s3:// URL) into ``out_dir``.

    ``sampling``: ``KEY=VALUE`` SamplingDefaults overrides of the defaults derived from the training
    config - the settings a release was evaluated with belong in it as its defaults (the demo ships
    temperature 0.3).
    """
    t0 = time.time()
    torch_dtype(dtype)  # a bad --dtype fails before any work
    if sampling:  # unknown keys or bad values fail before any work, naming the field
        load_config(SamplingDefaults, None, sampling)
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="sar-export-", dir=download_dir) as tmp:
        src = resolve_checkpoint(source, Path(tmp))
        fmt = model_config_for(src, model_config)
        meta = _train_metadata(src, fmt)
        if sampling:
            meta["sampling"] = load_config(SamplingDefaults, meta["sampling"].model_dump(), sampling)
        logger.info("exporting %s (%s, step %s) as %s%s", src.display, src.kind, meta["source"].global_step,
                    dtype, " EMA" if ema else "")
        state = consolidated_state(src.path, src.kind, trust_checkpoint, notes=src.notes)
        if ema:
            ema_sd = ema_state(src)
            missing = [k for k in state if k not in ema_sd]
            if missing:  # EMA covers trainable parameters; anything else keeps the trained value
                logger.info("EMA lacks %d tensors (buffers/frozen): using the trained values for %s", len(missing),
                            missing[:4])
            state = {k: ema_sd.get(k, v) for k, v in state.items()}
        manifest = _manifest_paths(src)
        tc = src.train_config
        vq_path = _locate("vq", vq, [("mlflow.vq_path", (tc.get("mlflow") or {}).get("vq_path")),
                                     ("the data manifest", manifest.get("vq"))])
        te_path = None
        if fmt.cond == "text":
            te_path = _locate("text_encoder", text_encoder,
                              [("data.text_encoder", (tc.get("data") or {}).get("text_encoder")),
                               ("the data manifest", manifest.get("text_encoder"))])
        cfg = write_export(out, state, fmt, vq=vq_path, text_encoder=te_path, dtype=dtype,
                           text_max_length=_text_max_length(src, manifest, fmt) if te_path else None,
                           max_shard_size=max_shard_size, ema=ema, source=meta["source"],
                           resolutions=meta["resolutions"], default_resolution=meta["default_resolution"],
                           sampling=meta["sampling"], data=_data_info(src), metrics=stage_metrics(src.run_dir),
                           name=name)
        run_dir = src.run_dir
        notes = list(src.notes)
    result = ExportResult(out, cfg, time.time() - t0, notes=notes)
    if register:
        result.registered = register_export(out, register, tracking_uri, cfg, run_dir)
    if upload:
        result.uploaded = upload_export(out, upload)
    return result


# ----------------------------------------------------------------------------- registry / upload


def _tracking_uri(explicit: str | None, cfg: ExportConfig, run_dir: Path | None) -> str:
    import os

    if explicit:
        return explicit
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if run_dir is not None and (run_dir / "mlflow.db").is_file():
        return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    raise ExportError("--register needs an MLflow tracking store: pass --tracking-uri (or set MLFLOW_TRACKING_URI)")


def register_export(out_dir: Path, name: str, tracking_uri: str | None, cfg: ExportConfig,
                    run_dir: Path | None = None) -> dict[str, Any]:
    """Log the export as artifacts (into the training run when the store has it) and register a version."""
    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = _tracking_uri(tracking_uri, cfg, run_dir)
    client = MlflowClient(uri)
    run_id = cfg.source.mlflow_run_id
    if run_id:
        try:
            client.get_run(run_id)
        except MlflowException:
            logger.info("training run %s is not in %s: logging the export into a new run", run_id, redact_text(uri))
            run_id = None
    if not run_id:
        exp = client.get_experiment_by_name("sar-scale-exports")
        exp_id = exp.experiment_id if exp else client.create_experiment("sar-scale-exports")
        run = client.create_run(exp_id, run_name=f"export-{name}", tags={"sar_scale.export": str(out_dir)})
        run_id = run.info.run_id
        client.set_terminated(run_id)
    client.log_artifacts(run_id, str(out_dir), "export")
    try:
        client.create_registered_model(name, description="SAR model exported by sar-scale")
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code) and "already exists" not in str(e):
            raise
    tags = {"global_step": str(cfg.source.global_step), "dtype": cfg.weights.dtype, "ema": str(cfg.weights.ema),
            "max_abs_logit_diff": str(cfg.verification.max_abs_logit_diff if cfg.verification else None)}
    mv = client.create_model_version(name, f"runs:/{run_id}/export", run_id=run_id, tags=tags,
                                     description=f"{cfg.model.get('name')} step {cfg.source.global_step}")
    logger.info("registered %s version %s (run %s)", name, mv.version, run_id)
    return {"name": name, "version": int(mv.version), "run_id": run_id, "source": mv.source,
            "tracking_uri": redact_text(uri)}


def upload_export(out_dir: Path, url: str) -> str:
    """Copy the export to ``url`` (s3://bucket/prefix or a directory); config.json goes last."""
    from tqdm import tqdm

    from sar_scale.data.storage import StorageError, open_storage

    store = open_storage(url)
    files = sorted(p for p in out_dir.rglob("*") if p.is_file())
    files = [p for p in files if p.name != CONFIG_NAME or p.parent != out_dir] + [out_dir / CONFIG_NAME]
    try:
        for p in tqdm(files, desc="uploading", unit="file"):
            store.put_file(p, p.relative_to(out_dir).as_posix())
    except StorageError as e:
        raise ExportError(f"upload to {redact_text(url)} failed: {e}") from None
    logger.info("uploaded %d files to %s", len(files), store.url())
    return store.url()


__all__ = ["ExportResult", "copy_text_encoder", "copy_vq", "export_checkpoint", "probe_batch", "register_export",
           "upload_export", "verify_export", "write_export"]
