"""Routes and history on an MLflow server behind its basic-auth app: the admin sets them, a read-only user reads
them and is refused a change (403, naming who to ask) (the tags live on the registered model, so MLflow's
permission on the model is what guards them)."""

from __future__ import annotations

import secrets

import pytest

from ground.errors import RegistryError
from registry import open_registry
from tests.mlflow_server import MlflowServerProcess
from tests.synthetic_lora import write_lora

PASSWORD = "pw-" + secrets.token_hex(12)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-auth-routes")
    ini = root / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{root / 'auth.db'}\nadmin_username = admin\nadmin_password = {PASSWORD}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    server = MlflowServerProcess(root / "server", app_name="basic-auth", env=env, workers=1).start()
    yield server
    server.stop()


@pytest.mark.slow
def test_routes_and_history_behind_basic_auth(auth_server, tmp_path, monkeypatch):
    for key in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    reg = open_registry(auth_server.uri, cache_dir=tmp_path / "cache")
    lora = write_lora(tmp_path / "lora", rank=4)
    reg.publish(lora, "secure", alias="prod")
    reg.publish(lora, "secure", alias="canary")
    reg.set_route("secure", {"prod": 90, "canary": 10}, reason="canary")
    reg.set_alias("secure", "prod", 2, kind="promote", figures={"reward": 0.7})
    assert reg.rollback("secure", "prod") == (2, 1)

    # a second user: MLflow gives it the default permission, READ
    import requests

    reader_password = "rd-" + secrets.token_hex(8)
    requests.post(f"{auth_server.url}/api/2.0/mlflow/users/create", auth=("admin", PASSWORD), timeout=30,
                  json={"username": "reader", "password": reader_password}).raise_for_status()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", reader_password)
    reader = open_registry(auth_server.uri, cache_dir=tmp_path / "cache")
    assert reader.get_route("secure").weights == {"prod": 90, "canary": 10}
    assert [e.kind for e in reader.history("secure")] == ["alias_set", "alias_set", "route_set", "promote", "rollback"]
    with pytest.raises(RegistryError, match="403 Forbidden"):
        reader.set_route("secure", {"prod": 100})
    with pytest.raises(RegistryError, match="403 Forbidden"):
        reader.record_event("secure", "promote", before=None, after=None)
    assert reader.get_route("secure").weights == {"prod": 90, "canary": 10} and len(reader.history("secure")) == 5
