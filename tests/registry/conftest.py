"""Registries for the contract tests: the local store, and a real `mlflow server` (one per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry import open_registry


from tests.mlflow_server import wipe

# `mlflow_server` (one real MLflow tracking server per session) is in tests/conftest.py


@pytest.fixture
def mlflow_reg(mlflow_server, tmp_path, monkeypatch):
    wipe(mlflow_server)
    monkeypatch.setenv("PIPELINE_REGISTRY_CACHE", str(tmp_path / "registry-cache"))
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    reg = open_registry(mlflow_server.uri)
    reg.test_server = mlflow_server
    return reg


@pytest.fixture(params=["local", "mlflow"])
def reg(request, tmp_path):
    """The registry contract holds for every store: each test that takes `reg` runs against both."""
    if request.param == "local":
        return open_registry(str(tmp_path / "store"), mirror_mlflow=False)
    return request.getfixturevalue("mlflow_reg")


def stored_file(reg, av, fname: str) -> Path:
    """Where the store itself keeps one file of a version (not a cached copy): for corrupting it in tests."""
    if getattr(reg, "test_server", None) is None:
        return av.path / fname
    from registry.mlflow_layout import PATH_TAG, tags_of

    mv = reg.store._model_version(av.name, av.version)
    return reg.test_server.artifacts / tags_of(mv)[PATH_TAG] / fname
