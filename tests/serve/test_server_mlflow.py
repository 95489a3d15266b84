"""`pipeline serve --registry mlflow+http://...`: the same server, its adapters on a real MLflow tracking server.

The server process and vLLM read the registry through the registry API only; the adapter folders vLLM loads are
this machine's verified cache of the server's files. One vLLM start for the module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import openai
import pytest

from registry import open_registry
from tests.mlflow_server import wipe
from tests.serve.adapters import make_adapters
from tests.serve.cli_server import free_port, start_cli
from tests.serve.test_server import MAX_TOKENS, _complete, _ids, _until_eos

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_serves_from_an_mlflow_registry_and_follows_an_alias_move(mlflow_server, tiny_model_dir, tmp_path):
    wipe(mlflow_server)
    cache = tmp_path / "serve-cache"
    reg = open_registry(mlflow_server.uri, cache_dir=tmp_path / "publisher-cache")
    dirs, answers = make_adapters(tiny_model_dir, tmp_path, seeds=[1, 2], max_new_tokens=MAX_TOKENS)
    reg.publish(dirs[1], "alpha", base_dir=tiny_model_dir, alias="prod")
    reg.publish(dirs[2], "alpha", base_dir=tiny_model_dir)

    port = free_port()
    env = {"PIPELINE_REGISTRY_CACHE": str(cache), "MLFLOW_TRACKING_URI": ""}
    cli, _, _ = start_cli(["--registry", mlflow_server.uri, "--base", str(tiny_model_dir), "--port", str(port),
                           "--max-loras", "2", "--max-model-len", "256", "--kv-cache-gib", "0.0625", "--dtype",
                           "float32", "--served-name", "tiny-base", "--alias-ttl", "0.5"], env=env)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        eos = json.loads((tiny_model_dir / "generation_config.json").read_text())["eos_token_id"]

        def answer(model):
            resp = _complete(client, model)
            return resp.model, _until_eos(_ids(resp.choices[0]), eos)

        assert answer("alpha@prod") == ("alpha@1", _until_eos(answers[1], eos))
        assert answer("alpha") == ("alpha@2", _until_eos(answers[2], eos))
        assert {m.id for m in client.models.list().data} >= {"alpha@1", "alpha@2", "alpha", "alpha@prod"}

        reg.set_alias("alpha", "prod", 2)  # on the server; no restart
        time.sleep(1.0)  # the alias TTL
        assert answer("alpha@prod") == ("alpha@2", _until_eos(answers[2], eos))

        # what vLLM loaded came from this machine's verified cache of the server's files
        cached = sorted(p.name.split("-")[0] for p in cache.glob("*/versions/alpha/*"))
        assert cached == ["1", "2"], cached
        assert not list(cache.glob("*/.tmp/*"))
    finally:
        if cli.poll() is None:
            cli.send_signal(signal.SIGINT)
            try:
                cli.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(cli.pid, signal.SIGKILL)
                cli.wait()
    assert cli.returncode == 0


def test_replicated_mode_serves_an_adapter_from_the_mlflow_registry(mlflow_server, tiny_model_dir, tmp_path):
    """`pipeline serve --replicas 2 --registry mlflow+http://...`: each replica reads the server through its own
    verified cache, and an adapter answers with its own weights (the tokens PEFT produces)."""
    from tests.serve.test_replicas import _complete as complete_replicated
    from tests.serve.test_replicas import replica_pids, start_replicated_cli

    wipe(mlflow_server)
    cache = tmp_path / "replica-cache"
    reg = open_registry(mlflow_server.uri, cache_dir=tmp_path / "publisher-cache")
    dirs, answers = make_adapters(tiny_model_dir, tmp_path, seeds=[3], max_new_tokens=MAX_TOKENS)
    reg.publish(dirs[3], "delta", base_dir=tiny_model_dir, alias="prod")
    port = free_port()
    cli, output = start_replicated_cli(
        ["--registry", mlflow_server.uri, "--base", str(tiny_model_dir), "--port", str(port), "--replicas", "2",
         "--max-loras", "1", "--max-cpu-loras", "1", "--max-model-len", "256", "--kv-cache-gib", "0.0625",
         "--dtype", "float32", "--served-name", "tiny-base"],
        env={"PIPELINE_REGISTRY_CACHE": str(cache), "MLFLOW_TRACKING_URI": ""})
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        eos = json.loads((tiny_model_dir / "generation_config.json").read_text())["eos_token_id"]
        resp, replica = complete_replicated(client, "delta@prod")
        assert resp.model == "delta@1" and replica, output
        assert _until_eos(resp.choices[0].model_extra["token_ids"], eos) == _until_eos(answers[3], eos)
        assert [p.name.split("-")[0] for p in cache.glob("*/versions/delta/*")] == ["1"]  # the server's files
    finally:
        if cli.poll() is None:
            cli.send_signal(signal.SIGINT)
            try:
                cli.communicate(timeout=180)
            except subprocess.TimeoutExpired:
                os.killpg(cli.pid, signal.SIGKILL)
                cli.wait()
    assert cli.returncode == 0
    deadline = time.monotonic() + 30
    while replica_pids() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert replica_pids() == {}
