"""MLflow tracking for a pipeline run: one parent run per pipeline run, a nested run per stage.

The client API is used instead of MLflow's fluent `start_run` because stages run in other processes (Ray
workers, the trainer) and a resumed pipeline re-attaches to its parent run by id; nothing here relies on a
process-global "active run".
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

from ground.mlflow_uri import PARENT_TAG, get_experiment_id, param_text, redact_uri, tracking_uri


class PipelineTracking:
    """The MLflow parent run of one pipeline run; stages get nested runs under it."""

    def __init__(self, run, enabled: bool = True):
        self.enabled = enabled
        self.parent_run_id: str | None = None
        self.uri: str | None = None
        if not enabled:
            return
        from mlflow.tracking import MlflowClient

        cfg = run.config
        self.uri = tracking_uri(cfg.trainer.mlflow_tracking_uri)
        self.client = MlflowClient(self.uri)
        self.experiment_id = get_experiment_id(self.client, cfg.trainer.project_name, self.uri)
        self.parent_run_id = run.manifest.get("mlflow_parent_run_id")
        if self.parent_run_id is None:  # a resumed run re-attaches to its parent
            parent = self.client.create_run(
                self.experiment_id, run_name=run.manifest["run_id"],
                tags={"pipeline": run.pipeline.name, "run_dir": str(run.run_dir.resolve())},
            )
            self.parent_run_id = parent.info.run_id
            run.manifest["mlflow_parent_run_id"] = self.parent_run_id
            run.manifest["mlflow_tracking_uri"] = redact_uri(self.uri)  # may be $MLFLOW_TRACKING_URI
            run.save()
            for key, value in cfg.flat().items():
                self.client.log_param(self.parent_run_id, key, param_text(value))
        else:
            self.client.update_run(self.parent_run_id, status="RUNNING")

    def start_stage(self, stage_name: str) -> str | None:
        """A nested run for a stage; returns its id."""
        if not self.enabled:
            return None
        child = self.client.create_run(self.experiment_id, run_name=stage_name,
                                       tags={PARENT_TAG: self.parent_run_id, "stage": stage_name})
        return child.info.run_id

    def end_stage(self, run_id: str | None, status: str, outputs: dict[str, Any] | None = None) -> None:
        if not self.enabled or run_id is None:
            return
        for key, value in (outputs or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.client.log_metric(run_id, key, float(value))
            elif isinstance(value, (str, bool)) or value is None:
                self.client.set_tag(run_id, f"output.{key}", param_text(value))
        self.client.set_terminated(run_id, "FINISHED" if status == "succeeded" else "FAILED")

    def log_metrics(self, metrics: dict[str, float]) -> None:
        if self.enabled:
            for key, value in metrics.items():
                self.client.log_metric(self.parent_run_id, key, float(value))

    def close(self, status: str) -> None:
        if self.enabled:
            mlflow_status = {"succeeded": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
            self.client.set_terminated(self.parent_run_id, mlflow_status)


def make_tracking(run) -> PipelineTracking:
    loggers = run.config.trainer.logger
    loggers = [loggers] if isinstance(loggers, str) else loggers
    return PipelineTracking(run, enabled="mlflow" in loggers)
