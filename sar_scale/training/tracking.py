"""MLflow tracking for training, rank 0 only (one MLflow run per training run, mlflow #11782).

The embedded default is a SQLite store in the run folder (no server); a tracking URI from the
config or ``MLFLOW_TRACKING_URI`` points at a real server. The run id is stored in the run folder
and in every checkpoint, so a resumed job keeps logging into the same MLflow run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from sar_scale.utils.redact import redact_obj, redact_text

logger = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
_MAX_PARAM = 6000  # MLflow's limit on a param value


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists of dicts are indexed: ``stages.0.name``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(flatten(x, f"{key}.{i}."))
        else:
            out[key] = v
    return out


# MLflow 3's UI opens an experiment in its GenAI view ("Evaluation runs", traces) unless the experiment's
# kind says otherwise; "custom_model_development" is the model-training view (runs, charts, compare).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"


def mark_training_experiment(client, experiment_id: str) -> None:
    """Tag an experiment as model training (kept when a user already chose a kind)."""
    exp = client.get_experiment(experiment_id)
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)


# MLflow's run page groups charts into sections by key prefix and sorts the sections by name
# (localeCompare), with unprefixed keys last; eval results ("eval/...") would come first and the loss
# curves last. Numbered sections put the training charts first, loss in the first row; the plain
# names stay the keys of metrics.jsonl and of this mapping's input.
_SECTIONS = {"loss": "1-train", "lr": "1-train", "grad_norm": "1-train",
             "tokens_per_s": "2-throughput", "samples_per_s": "2-throughput", "flops_per_s": "2-throughput",
             "mfu": "2-throughput", "step_time_s": "2-throughput", "data_wait_s": "2-throughput",
             "stage": "5-curriculum", "resolution": "5-curriculum"}


def dashboard_key(name: str) -> str:
    """The MLflow key of a training metric: ``loss`` -> ``1-train/loss``, ``loss/s256`` (per stage) ->
    ``3-loss-by-stage/s256``, ``loss/bucket_16x16`` -> ``4-loss-by-bucket/16x16``; others unchanged."""
    if name in _SECTIONS:
        return f"{_SECTIONS[name]}/{name}"
    if name.startswith("loss/bucket_"):
        return "4-loss-by-bucket/" + name[len("loss/bucket_"):]
    if name.startswith("loss/"):
        return "3-loss-by-stage/" + name[len("loss/"):]
    return name


def default_tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"


class Tracker:
    """MLflow on rank 0; a silent no-op on other ranks or when disabled."""

    def __init__(self, enabled: bool, run_dir: Path, tracking_uri: str | None = None,
                 experiment: str = "sar-scale", run_name: str | None = None, system_metrics: bool = False):
        self.enabled = enabled
        self.run_dir = run_dir
        self.uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(run_dir)
        self.embedded = not (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        self.experiment, self.run_name, self.system_metrics = experiment, run_name, system_metrics
        self.run_id: str | None = None
        self._mlflow = None

    def start(self, run_id: str | None, config: dict[str, Any], tags: dict[str, str] | None = None) -> str | None:
        """Start (or reattach to ``run_id``) and log the flattened, redacted config as params."""
        if not self.enabled:
            return None
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow

        self._mlflow = mlflow
        # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; restored in end() so a later run in
        # this process does not mistake our embedded store for a user-chosen one
        self._prev_env = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)
        run_id = run_id or self._saved_run_id()
        exp = mlflow.get_experiment_by_name(self.experiment)
        if exp is None:
            # embedded store: keep artifacts inside the run folder, not in ./mlruns of the cwd
            loc = (self.run_dir.resolve() / "mlartifacts").as_uri() if self.embedded else None
            exp_id = mlflow.create_experiment(self.experiment, artifact_location=loc)
        else:
            exp_id = exp.experiment_id
        try:
            mark_training_experiment(mlflow.MlflowClient(), exp_id)
        except Exception as e:  # noqa: BLE001 - a UI nicety must not stop training
            logger.warning("could not tag the MLflow experiment's kind: %s", redact_text(str(e)))
        run = None
        if run_id:
            try:
                run = mlflow.start_run(run_id=run_id, log_system_metrics=self.system_metrics)
                logger.info("reattached to MLflow run %s", run_id)
            except Exception as e:  # noqa: BLE001 - the store may have been reset: start fresh, say so
                logger.warning("could not reattach to MLflow run %s (%s); starting a new run", run_id,
                               redact_text(str(e)))
        if run is None:
            run_name = redact_text(self.run_name) if self.run_name else None
            run = mlflow.start_run(experiment_id=exp_id, run_name=run_name,
                                   log_system_metrics=self.system_metrics)
        self.run_id = run.info.run_id
        (self.run_dir / RUN_ID_FILE).write_text(self.run_id)
        self._log_params(config)
        if tags:
            mlflow.set_tags({k: redact_text(str(v)) for k, v in tags.items()})
        return self.run_id

    def _saved_run_id(self) -> str | None:
        p = self.run_dir / RUN_ID_FILE
        return p.read_text().strip() or None if p.is_file() else None

    def _log_params(self, config: dict[str, Any]) -> None:
        mlflow = self._mlflow
        params = {k: str(v)[:_MAX_PARAM] for k, v in flatten(redact_obj(config)).items()}
        existing = mlflow.get_run(self.run_id).data.params
        new = {k: v for k, v in params.items() if k not in existing}
        changed = {k: v for k, v in params.items() if k in existing and existing[k] != v}
        keys = sorted(new)
        for i in range(0, len(keys), 100):  # log_batch takes at most 100 params per call
            mlflow.log_params({k: new[k] for k in keys[i:i + 100]})
        if changed:  # params are immutable in MLflow: record a resumed run's changes as tags
            mlflow.set_tags({f"resume.changed.{k}": v for k, v in changed.items()})

    def _safe(self, what: str, fn, *args, **kwargs) -> None:
        """Tracking must not kill a week-long run: MLflow retries requests itself; after that we log and go on."""
        if not (self.enabled and self._mlflow is not None):
            return
        try:
            fn(*args, **kwargs)
            self._failures = 0
        except Exception as e:  # noqa: BLE001 - reported, training continues
            self._failures = getattr(self, "_failures", 0) + 1
            if self._failures <= 3 or self._failures % 100 == 0:
                logger.warning("MLflow %s failed (%d in a row): %s", what, self._failures, redact_text(str(e)))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._safe("log_metrics", lambda: self._mlflow.log_metrics(
            {k: float(v) for k, v in metrics.items() if v is not None}, step=step))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._safe("set_tags", lambda: self._mlflow.set_tags({k: redact_text(str(v)) for k, v in tags.items()}))

    def log_image(self, image, artifact_file: str) -> None:
        self._safe("log_image", lambda: self._mlflow.log_image(image, artifact_file=artifact_file))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._safe("log_text", lambda: self._mlflow.log_text(redact_text(text), artifact_file))

    def end(self, status: str = "FINISHED") -> None:
        if not (self.enabled and self._mlflow is not None):
            return
        if self._mlflow.active_run() is not None:
            self._mlflow.end_run(status=status)
        if self._prev_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = self._prev_env
