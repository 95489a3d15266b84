"""MLflow tracking of a training run: every resolved config key as a parameter, per-step and validation
metrics, the final adapter as an artifact.

The store is `ground.mlflow_uri.tracking_uri(...)`: `trainer.mlflow_tracking_uri`, else $MLFLOW_TRACKING_URI,
else a local sqlite file that needs no server. Under a pipeline the run nests under the pipeline's parent run
(`parent_run_id`). A resumed training run continues its MLflow run (its id is kept in the checkpoint).
The client API is used (no process-global active run), so several trainers in one process cannot collide.

`trainer.logger`'s other trackers (wandb, tensorboard, file; stages/train/loggers.py) get every metric MLflow
gets, and the validation table where they have tables; `destinations` says where each one wrote.
"""

from __future__ import annotations

import logging
import math
import time

from ground.mlflow_uri import param_text, redact_uri

log = logging.getLogger(__name__)


class TrainTracking:
    """MLflow when `trainer.logger` includes `mlflow` (`enabled`), and the other trackers it names."""

    def __init__(self, cfg, parent_run_id: str | None = None, resume_run_id: str | None = None,
                 out_dir: str | None = None):
        from config.loggers import logger_names
        from stages.train.loggers import open_loggers

        names = logger_names(cfg)
        self.enabled = "mlflow" in names
        self.run_id: str | None = None
        # The others first: they are the ones that can fail to start (W&B offline from its server), and a failure
        # then leaves no MLflow run behind marked as running.
        self.others = open_loggers(cfg, out_dir or cfg.trainer.default_local_dir, names)
        self.destinations = {logger.name: logger.where for logger in self.others}
        if not self.enabled:
            return
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        from ground.mlflow_uri import PARENT_TAG, get_experiment_id, tracking_uri

        self.uri = tracking_uri(cfg.trainer.mlflow_tracking_uri)
        self.client = MlflowClient(self.uri)
        if resume_run_id and self._exists(resume_run_id):
            self.run_id = resume_run_id
            self.client.update_run(self.run_id, status="RUNNING")
            log.info("continuing MLflow run %s", self.run_id)
            self.destinations = {"mlflow": f"run {self.run_id} at {redact_uri(self.uri)}", **self.destinations}
            return
        experiment_id = get_experiment_id(self.client, cfg.trainer.project_name, self.uri)
        tags = {"stage": "train"}
        if parent_run_id:
            tags[PARENT_TAG] = parent_run_id
        run = self.client.create_run(experiment_id, run_name=cfg.trainer.experiment_name, tags=tags)
        self.run_id = run.info.run_id
        params = [Param(k, param_text(v)) for k, v in cfg.flat().items()]
        for start in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        log.info("MLflow run %s at %s", self.run_id, redact_uri(self.uri))  # the URI may come from the environment
        self.destinations = {"mlflow": f"run {self.run_id} at {redact_uri(self.uri)}", **self.destinations}

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:
            return False

    def log_metrics(self, metrics: dict, step: int) -> None:
        for logger in self.others:
            logger.log_metrics(metrics, step)
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(_metric_key(k), float(v), now, step) for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        for start in range(0, len(rows), 1000):
            self.client.log_batch(self.run_id, metrics=rows[start : start + 1000])

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        if self.enabled:
            self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def log_table(self, rows: list[dict], artifact_file: str, step: int = 0) -> None:
        """Rows of dicts as an MLflow table artifact (column-wise JSON, what `mlflow.load_table` reads), a W&B
        table, TensorBoard text."""
        if not rows:
            return
        for logger in self.others:
            logger.log_table(rows, step)
        if self.run_id is None:
            return
        columns = {key: [row.get(key) for row in rows] for key in dict.fromkeys(k for row in rows for k in row)}
        self.client.log_table(self.run_id, columns, artifact_file)

    def set_tags(self, tags: dict) -> None:
        if self.enabled:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, param_text(v))

    def end(self, status: str) -> None:
        for logger in self.others:
            try:
                logger.finish(status)
            except Exception as exc:  # one tracker failing to close must not hide the run's outcome or the others
                log.warning("closing the %s logger failed: %s", logger.name, exc)
        self.others = []
        if self.enabled and self.run_id:
            self.client.set_terminated(self.run_id, status)


def _metric_key(key: str) -> str:
    # MLflow keys allow letters, digits, _ - . / and spaces; our keys only use those, but stay safe.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)
