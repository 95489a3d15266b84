"""A URI never shows a secret: a registry or tracking URI holding credentials or a query is refused when the
config loads (before any run directory, config.yaml or MLflow param exists), and every message that shows a
URI, malformed or not, shows it through `ground.mlflow_uri.redact_uri`."""

from __future__ import annotations

import pytest

from config import load_config
from ground.errors import ConfigError
from ground.mlflow_uri import redact_uri, secret_parts
from pipeline.cli import cli_entry

SECRET = "PW-s3cr3t"
MALFORMED = [
    f"mlflow+http://user:{SECRET}@",  # no host
    f"mlflow+htp://user:{SECRET}@127.0.0.1:5000",  # misspelt scheme
    f"http://user:{SECRET}@127.0.0.1:5000",  # the server's own URL instead of mlflow+http
    f"mlflow+http://127.0.0.1:5000?token={SECRET}",  # a token in the query
    f"mlflow+http://user:{SECRET}@[::1",  # a host no parser accepts
]
WITH_CREDENTIALS = f"mlflow+http://user:{SECRET}@127.0.0.1:5000"


def _run(args, capfd):
    code = cli_entry(args)
    out, err = capfd.readouterr()
    return code, out + err


@pytest.mark.parametrize("uri", MALFORMED + [WITH_CREDENTIALS])
@pytest.mark.parametrize("start", [None, "x@1"])
def test_run_refuses_a_uri_with_a_secret_at_load_without_showing_it(tmp_path, tiny_model_dir, capfd, uri, start):
    args = ["run", "train-and-publish", f"registry.uri={uri}", f"actor_rollout_ref.model.path={tiny_model_dir}"]
    if start:
        args.append(f"actor_rollout_ref.model.lora_adapter_path={start}")
    code, shown = _run(args, capfd)
    assert code == 2, shown
    assert SECRET not in shown and "Traceback" not in shown
    assert "registry.uri" in shown and "MLFLOW_TRACKING_USERNAME" in shown, shown
    assert not (tmp_path / "runs").exists() and not list(tmp_path.rglob("config.yaml"))  # nothing was written


def test_stage_model_pipeline_with_credentials_writes_nothing(tmp_path, tiny_model_dir, capfd):
    """The short pipeline that, before the load-time check, ran to the end and kept the password in its
    run directory's config.yaml and in the MLflow params."""
    code, shown = _run(["run", "stage-model", f"registry.uri={WITH_CREDENTIALS}",
                        f"actor_rollout_ref.model.path={tiny_model_dir}", "--run-dir", str(tmp_path / "r")], capfd)
    assert code == 2 and SECRET not in shown and "MLFLOW_TRACKING_PASSWORD" in shown, shown
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("uri", [f"http://admin:{SECRET}@127.0.0.1:5000", f"postgresql://u:{SECRET}@db/mlflow",
                                 f"http://127.0.0.1:5000/?token={SECRET}"])
def test_tracking_uri_with_a_secret_is_refused_and_points_at_the_environment(uri):
    with pytest.raises(ConfigError) as refused:
        load_config(None, [f"trainer.mlflow_tracking_uri={uri}"])
    message = str(refused.value)
    assert SECRET not in message and "trainer.mlflow_tracking_uri" in message and "$MLFLOW_TRACKING_URI" in message


def test_credentials_in_a_config_file_name_the_file_not_the_password(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(f"registry:\n  uri: {WITH_CREDENTIALS}\n")
    with pytest.raises(ConfigError, match=r"registry\.uri=mlflow\+http://\*\*\*@127\.0\.0\.1:5000.*c\.yaml") as refused:
        load_config(f)
    assert SECRET not in str(refused.value)


def test_plain_uris_and_paths_still_load(tmp_path):
    cfg = load_config(None, ["registry.uri=mlflow+http://127.0.0.1:5000",
                             f"trainer.mlflow_tracking_uri=sqlite:///{tmp_path}/m.db"])
    assert cfg.registry.uri == "mlflow+http://127.0.0.1:5000"
    assert load_config(None, [f"registry.uri={tmp_path}/store"]).registry.uri == f"{tmp_path}/store"


@pytest.mark.parametrize("uri", MALFORMED + [WITH_CREDENTIALS])
def test_registry_command_shows_no_secret(tmp_path, capfd, uri):
    code, shown = _run(["registry", "--registry", uri, "list"], capfd)
    assert code == 2 and SECRET not in shown and "Traceback" not in shown, shown


@pytest.mark.parametrize("uri", MALFORMED + [WITH_CREDENTIALS])
def test_serve_shows_no_secret(tmp_path, tiny_model_dir, capfd, uri):
    code, shown = _run(["serve", "--registry", uri, "--base", str(tiny_model_dir)], capfd)
    assert code == 2 and SECRET not in shown and "Traceback" not in shown, shown


@pytest.mark.parametrize("uri", MALFORMED)
def test_start_adapter_from_the_environment_shows_no_secret(monkeypatch, capfd, uri):
    """$PIPELINE_REGISTRY is not part of the config, so the load-time check does not see it: the "could not
    resolve" message of lora_adapter_path must still hide what it holds."""
    monkeypatch.setenv("PIPELINE_REGISTRY", uri)
    code, shown = _run(["train", "actor_rollout_ref.model.lora_adapter_path=x@1"], capfd)
    assert code == 2 and SECRET not in shown and "Traceback" not in shown, shown
    assert "lora_adapter_path" in shown


@pytest.mark.parametrize("uri, shown", [
    (f"mlflow+http://user:{SECRET}@", "mlflow+http://***@"),
    (f"mlflow+http://user:{SECRET}@host:5000/path", "mlflow+http://***@host:5000/path"),
    (f"mlflow+http://u:pa/s{SECRET}@host:5000", "mlflow+http://***@host:5000"),  # an unescaped '/' in it
    (f"mlflow+http://host:5000?token={SECRET}", "mlflow+http://host:5000?***"),
    (f"https://host/x#{SECRET}", "https://host/x#***"),
    ("models:/name@prod", "models:/name@prod"),
    ("./registry-store", "./registry-store"),
    ("/data/odd?name", "/data/odd?name"),  # a path, not a URI: nothing to hide
    ("C:/store", "C:/store"),
])
def test_redact_uri(uri, shown):
    assert redact_uri(uri) == shown
    assert bool(secret_parts(uri)) == (uri != shown)


def test_a_uri_of_the_wrong_type_is_refused_without_echoing_it():
    with pytest.raises(ConfigError, match=r"registry\.uri") as refused:
        load_config(None, [f"registry.uri=[{WITH_CREDENTIALS}]"])
    assert SECRET not in str(refused.value)


@pytest.mark.parametrize("args", [["config", "show", WITH_CREDENTIALS],  # the value without its `registry.uri=`
                                  ["run", "train", f"registry.uri{WITH_CREDENTIALS}"]])
def test_a_uri_typed_in_the_wrong_place_is_shown_redacted(capfd, args):
    code, shown = _run(args, capfd)
    assert code == 2 and SECRET not in shown and "***@127.0.0.1:5000" in shown, shown


def test_a_failed_stage_records_its_error_redacted(tmp_path):
    from pipeline.runner import Pipeline, Run, Stage, read_manifest
    from ground.errors import StageError

    def leaky(ctx):
        raise StageError(f"could not reach {WITH_CREDENTIALS}/api")

    def crashing(ctx):
        raise RuntimeError(f"connection to https://bob:{SECRET}@example.org?sig={SECRET} reset")

    for stage in (leaky, crashing):
        run = Run.create(Pipeline("p", [Stage("s", stage)]), load_config(None, []), tmp_path / stage.__name__)
        with pytest.raises(Exception):
            run.execute()
        assert SECRET not in (tmp_path / stage.__name__ / "manifest.json").read_text()
        assert "***@" in read_manifest(tmp_path / stage.__name__)["stages"][0]["error"]
