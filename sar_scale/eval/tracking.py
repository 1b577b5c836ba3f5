"""Log evaluation results to MLflow: into the training run when known, else a run of its own.

Results go in with ``MlflowClient`` calls on a run id (not ``mlflow.start_run``), so logging into a
finished training run adds metrics and artifacts without reopening it or changing its status.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class EvalLogger:
    """One MLflow run that receives metrics (``eval/...``) and artifacts (``eval/...``)."""

    def __init__(self, tracking_uri: str, run_id: str | None = None, experiment: str = "sar-scale-eval",
                 run_name: str | None = None, tags: dict[str, str] | None = None):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.created = False
        if run_id is not None:
            try:
                self.client.get_run(run_id)
            except Exception:  # noqa: BLE001 - unknown id in this store: say so, log to a new run
                logger.warning("MLflow run %s is not in %s; logging the evaluation to a new run", run_id,
                               tracking_uri)
                run_id = None
        if run_id is None:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
            from sar_scale.training.tracking import mark_training_experiment

            mark_training_experiment(self.client, exp_id)
            run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags or {}).info.run_id
            self.created = True
        elif tags:
            for k, v in tags.items():
                self.client.set_tag(run_id, k, v)
        self.run_id = run_id
        run = self.client.get_run(run_id)
        self.experiment_id = run.info.experiment_id

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 1000):  # log_batch limit
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_params(self, params: dict[str, Any]) -> None:
        """Params are immutable in MLflow: only set on a run this logger created."""
        if self.created:
            from mlflow.entities import Param

            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self) -> None:
        if self.created:
            self.client.set_terminated(self.run_id, "FINISHED")

    @property
    def run_link(self) -> str:
        return f"#/experiments/{self.experiment_id}/runs/{self.run_id}"
