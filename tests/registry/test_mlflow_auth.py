"""MLflow's basic-auth app in front of the registry: refused without credentials (a clear message, exit 2, no
traceback), working with them, and the password in no output, log or cached file."""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from ground.errors import RegistryError
from registry import open_registry
from tests.synthetic_lora import write_lora
from tests.mlflow_server import MlflowServerProcess

PIPELINE = str(Path(sys.executable).parent / "pipeline")
PASSWORD = "pw-" + secrets.token_hex(12)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-auth")
    ini = root / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{root / 'auth.db'}\nadmin_username = admin\nadmin_password = {PASSWORD}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    server = MlflowServerProcess(root / "server", app_name="basic-auth", env=env, workers=1).start()
    yield server
    server.stop()


def _cli(server, *args, env_extra=None, tmp_path=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(PIPELINE_REGISTRY_CACHE=str(tmp_path / "cache"), **(env_extra or {}))
    return subprocess.run([PIPELINE, "-v", "registry", "--registry", server.uri, *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_basic_auth(auth_server, tmp_path, monkeypatch, caplog):
    lora = write_lora(tmp_path / "lora", rank=4)
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)

    # anonymous: refused, with the server and the variables to set, as a real CLI process
    anon = _cli(auth_server, "publish", str(lora), "--name", "secure", tmp_path=tmp_path)
    assert anon.returncode == 2, anon.stderr
    assert auth_server.url in anon.stderr and "MLFLOW_TRACKING_USERNAME" in anon.stderr, anon.stderr
    assert "MLFLOW_TRACKING_PASSWORD" in anon.stderr and "Traceback" not in anon.stderr

    # a wrong password: refused, naming the variables, never their values
    wrong = "wrong-" + secrets.token_hex(8)
    bad = _cli(auth_server, "list", env_extra={"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": wrong},
               tmp_path=tmp_path)
    assert bad.returncode == 2 and "rejected the credentials" in bad.stderr, bad.stderr
    assert wrong not in bad.stdout + bad.stderr

    # with credentials: the whole round trip works, as a process and in-process
    creds = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": PASSWORD}
    ok = _cli(auth_server, "publish", str(lora), "--name", "secure", "--alias", "prod", env_extra=creds,
              tmp_path=tmp_path)
    assert ok.returncode == 0 and "published secure@1 (alias prod)" in ok.stdout, ok.stderr
    for key, value in creds.items():
        monkeypatch.setenv(key, value)
    caplog.set_level(logging.DEBUG)
    reg = open_registry(auth_server.uri, cache_dir=tmp_path / "cache2")
    assert reg.publish(lora, "secure").version == 2
    av = reg.resolve("secure@prod")
    assert av.version == 1 and (av.path / "adapter_model.safetensors").read_bytes() == \
        (lora / "adapter_model.safetensors").read_bytes()
    assert reg.verify().ok

    # the anonymous user may read (default_permission READ) but a read-only user may not publish
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    with pytest.raises(RegistryError, match="MLFLOW_TRACKING_USERNAME") as refused:
        open_registry(auth_server.uri, cache_dir=tmp_path / "cache3").publish(lora, "secure")
    assert auth_server.url in str(refused.value)

    # the password is nowhere: CLI output, Python logs, the server's log, cached files
    texts = [anon.stdout, anon.stderr, bad.stdout, bad.stderr, ok.stdout, ok.stderr, caplog.text,
             auth_server.log_text(), str(refused.value)]
    texts += [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size < 1 << 20]
    assert not [t for t in texts if PASSWORD in t]
