"""The two registry stores a test runs on, as one parametrised fixture: `store_uri` is a local folder, or the
session's real MLflow server (tests/conftest.py `mlflow_server`) wiped for the test. Modules that use it import
it (`from tests.registry_stores import store_uri`)."""

from __future__ import annotations

import pytest

from tests.mlflow_server import wipe


@pytest.fixture(params=["local", "mlflow"])
def store_uri(request, tmp_path, monkeypatch):
    if request.param == "local":
        return str(tmp_path / "store")
    server = request.getfixturevalue("mlflow_server")
    wipe(server)
    monkeypatch.setenv("PIPELINE_REGISTRY_CACHE", str(tmp_path / "registry-cache"))
    # the server needs no login: credentials from the caller's environment would only hide a missing one
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    return server.uri
