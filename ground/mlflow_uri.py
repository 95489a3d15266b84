"""Where MLflow runs are tracked, shared by the pipeline runner and the training stage."""

from __future__ import annotations

import os
from pathlib import Path

PARENT_TAG = "mlflow.parentRunId"


def tracking_uri(configured: str | None = None) -> str:
    """Where runs are tracked: the config's `trainer.mlflow_tracking_uri`, else $MLFLOW_TRACKING_URI, else a
    local sqlite store `./mlruns/mlflow.db` that needs no server."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path("mlruns").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def artifact_root(uri: str) -> str | None:
    """Artifacts of a local sqlite store live beside its database."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return None


def get_experiment_id(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(uri))
    except Exception:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id
