"""Find a training checkpoint (run folder, checkpoint root, one checkpoint, or s3://) and consolidate it.

Consolidation is DeepSpeed's own: ``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` in lazy
mode for ZeRO 1/2/3 (partitions are stitched per tensor on demand, optimizer files are mmapped),
the per-parameter ``zero/<name>/fp32.pt`` files of a universal checkpoint (``ds_to_universal``),
or the full ``module`` weights of a ZeRO-0 checkpoint.

Safety: DeepSpeed pickles its checkpoints and calls ``torch.load(weights_only=False)``. We run it
with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` and allowlist exactly the few plain-data DeepSpeed classes
those files contain, so torch's restricted unpickler reads them and no code in a checkpoint can run.
A checkpoint holding anything else is refused with the offending names (``--trust-checkpoint``
lifts this for checkpoints you wrote yourself). Checkpoints written by sar-scale's checkpoint manager
are also verified against their ``COMPLETE.json`` checksums before anything is read.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sar_scale.checkpoint.manager import (
    COMPLETE,
    EMA_FILE,
    LATEST,
    TRAIN_STATE,
    CheckpointError,
    list_checkpoints,
    read_marker,
    step_of,
    verify_checkpoint,
)
from sar_scale.utils.redact import redact_text

if TYPE_CHECKING:
    from sar_scale.models import FMTConfig

logger = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The checkpoint cannot be exported as asked; the message names the file or option."""


@dataclass
class CheckpointSource:
    path: Path  # the checkpoint (tag) folder, local
    kind: str  # "zero" | "universal" | "stage0"
    train_state: dict[str, Any] | None
    run_dir: Path | None
    display: str  # what to print / record (redacted)
    verified: bool  # COMPLETE.json checksums matched
    notes: list[str] = field(default_factory=list)

    @property
    def tag(self) -> str:
        return self.path.name

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def train_config(self) -> dict[str, Any]:
        return dict((self.train_state or {}).get("config") or {})


# ----------------------------------------------------------------------------- locating


def _is_checkpoint_dir(p: Path) -> bool:
    return p.is_dir() and ((p / TRAIN_STATE).is_file() or (p / COMPLETE).is_file() or (p / "zero").is_dir()
                           or any(p.glob("*_model_states.pt")))


def _kind(p: Path) -> str:
    if (p / "zero").is_dir() and any((p / "zero").glob("*/fp32.pt")):
        return "universal"
    if any(p.glob("*_optim_states.pt")):
        return "zero"
    if any(p.glob("*model_states.pt")):
        return "stage0"
    raise ExportError(f"{p}: no DeepSpeed checkpoint files (*_model_states.pt, *_optim_states.pt or "
                      "a universal zero/ folder)")


def _pick_in_root(root: Path) -> Path:
    """Newest complete sar-scale checkpoint under ``root``; else DeepSpeed's ``latest`` tag."""
    complete = [c for c in list_checkpoints(root) if c.complete]
    if complete:
        return complete[-1].path
    latest = root / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if not (root / tag).is_dir():
            raise ExportError(f"{latest} names {tag!r}, which is not a folder in {root}")
        return root / tag
    incomplete = [c.path.name for c in list_checkpoints(root)]
    raise ExportError(f"{root}: no complete checkpoint (incomplete: {incomplete}) and no '{LATEST}' file")


def _run_config_ckpt_dir(run_dir: Path) -> Path | None:
    cfg_file = run_dir / "config.yaml"
    if cfg_file.is_file():
        import yaml

        try:
            d = (yaml.safe_load(cfg_file.read_text()) or {}).get("checkpoint", {}).get("dir")
        except (yaml.YAMLError, AttributeError):
            d = None
        if d:
            return Path(d)
    return None


def _guess_run_dir(ckpt: Path, state: dict[str, Any] | None) -> Path | None:
    for cand in (ckpt.parent.parent, Path(str((state or {}).get("config", {}).get("run_dir", "")) or "/nonexistent")):
        if (cand / "config.yaml").is_file() or (cand / "metrics.jsonl").is_file():
            return cand
    return None


def resolve_local(path: str | Path) -> CheckpointSource:
    """A run folder, a checkpoint root (``latest`` + tags), or one checkpoint folder."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if _is_checkpoint_dir(p):
        ckpt = p
    elif (p / LATEST).is_file() or list_checkpoints(p):
        ckpt = _pick_in_root(p)
    elif (p / "checkpoints").is_dir() or _run_config_ckpt_dir(p):
        ckpt = _pick_in_root(_run_config_ckpt_dir(p) or p / "checkpoints")
    else:
        raise ExportError(f"{p}: not a run folder (no checkpoints/), a checkpoint root (no '{LATEST}') "
                          "or a checkpoint folder (no train_state.json / DeepSpeed files)")
    verified = False
    if (ckpt / COMPLETE).is_file():
        try:
            read_marker(ckpt)
            verify_checkpoint(ckpt)  # sha256 of every file, before anything is unpickled
        except CheckpointError as e:
            raise ExportError(f"checkpoint failed verification: {e}") from None
        verified = True
    elif (ckpt / TRAIN_STATE).is_file():
        raise ExportError(f"{ckpt}: incomplete checkpoint (no {COMPLETE}: its save was interrupted); "
                          "export an older one")
    state = None
    if (ckpt / TRAIN_STATE).is_file():
        try:
            state = json.loads((ckpt / TRAIN_STATE).read_text())
        except json.JSONDecodeError as e:
            raise ExportError(f"{ckpt / TRAIN_STATE}: invalid JSON ({e})") from None
    src = CheckpointSource(ckpt, _kind(ckpt), state, _guess_run_dir(ckpt, state), str(ckpt), verified)
    if not verified:
        src.notes.append(f"{ckpt} has no {COMPLETE} commit marker: checksums not verified")
        logger.warning(src.notes[-1])
    return src


def download_s3(url: str, dest: Path) -> Path:
    """Download one checkpoint from ``s3://`` (a mirror root with ``latest``, or one checkpoint prefix)."""
    from sar_scale.data.storage import StorageError, open_storage

    store = open_storage(url)
    shown = redact_text(url)
    try:
        if store.exists(COMPLETE) or store.exists(TRAIN_STATE):
            prefix, tag = "", url.rstrip("/").rsplit("/", 1)[-1]
        else:
            tags = sorted({k.split("/", 1)[0] for k in store.list("") if k.endswith("/" + COMPLETE)},
                          key=lambda t: step_of(t) if step_of(t) is not None else -1)
            if store.exists(LATEST):
                tag = store.get_bytes(LATEST).decode().strip()
            elif tags:
                tag = tags[-1]
            else:
                raise ExportError(f"{shown}: no checkpoint found (no {LATEST}, no */{COMPLETE})")
            prefix = tag + "/"
        if store.exists(prefix + COMPLETE):
            marker = json.loads(store.get_bytes(prefix + COMPLETE))
            files = [*sorted(marker.get("files", {})), COMPLETE]
        else:
            files = [k[len(prefix):] for k in store.list(prefix)]
        if not files:
            raise ExportError(f"{shown}: checkpoint {tag!r} has no files")
        local = dest / tag
        from tqdm import tqdm

        for rel in tqdm(files, desc=f"downloading {tag}", unit="file"):
            store.get_file(prefix + rel, local / rel)
    except StorageError as e:
        raise ExportError(f"cannot download checkpoint from {shown}: {e}") from None
    logger.info("downloaded %d files of %s from %s", len(files), tag, shown)
    return local


def resolve_checkpoint(source: str, download_dir: Path) -> CheckpointSource:
    """Local path or ``s3://`` URL -> a local, verified :class:`CheckpointSource`."""
    if str(source).startswith("s3://"):
        src = resolve_local(download_s3(str(source), download_dir))
        src.display = redact_text(str(source).rstrip("/") + ("" if str(source).rstrip("/").endswith(src.tag)
                                                              else f"/{src.tag}"))
        src.run_dir = None
        return src
    return resolve_local(source)


def ema_state(src: CheckpointSource) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = src.path / EMA_FILE
    if not path.is_file():
        raise ExportError(f"--ema: {path} not found (the run was trained without ema.enabled, or the "
                          "checkpoint predates EMA)")
    return load_file(str(path))


def model_config_for(src: CheckpointSource, override: str | None = None) -> FMTConfig:
    """The FMTConfig of the checkpoint: ``override`` (named size or a JSON/YAML file of FMTConfig
    fields), else the training config stored with the checkpoint (or in its run folder)."""
    from sar_scale.config import load_config
    from sar_scale.models import FMTConfig, get_config

    if override:
        p = Path(override)
        if p.is_file() and p.suffix == ".json":
            data = json.loads(p.read_text())
            return get_config(data["model"] if "format" in data else data)  # an export's config.json works too
        if p.is_file():
            return load_config(FMTConfig, p)
        return get_config(override)
    model = src.train_config.get("model")
    if model is None and src.run_dir is not None and (src.run_dir / "config.yaml").is_file():
        import yaml

        model = (yaml.safe_load((src.run_dir / "config.yaml").read_text()) or {}).get("model")
    if not model:
        raise ExportError(f"{src.path}: cannot tell the model architecture (no {TRAIN_STATE} with a config); "
                          "pass --model-config NAME|FILE")
    return get_config(model.get("name", "debug"), **(model.get("overrides") or {}))


def stage_metrics(run_dir: Path | None) -> dict[str, dict[str, float]]:
    """Last logged loss per stage from the run's metrics.jsonl (empty when unavailable)."""
    out: dict[str, dict[str, float]] = {}
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return out
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        name = rec.get("stage_name")
        if name and isinstance(rec.get("loss"), (int, float)):
            out[name] = {"final_loss": float(rec["loss"]), "step": int(rec.get("step", 0))}
    return out


_STEP_RE = re.compile(r"(\d+)$")


def global_step_of(src: CheckpointSource) -> int | None:
    if src.train_state and "global_step" in src.train_state:
        return int(src.train_state["global_step"])
    m = _STEP_RE.search(src.tag)
    return int(m.group(1)) if m else None


__all__ = ["CheckpointSource", "ExportError", "download_s3", "ema_state", "global_step_of", "model_config_for",
           "resolve_checkpoint", "resolve_local", "stage_metrics"]
