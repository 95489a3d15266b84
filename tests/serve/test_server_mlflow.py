"""`pipeline serve --registry mlflow+http://...`: the same server, its adapters on a real MLflow tracking server.

The server process and vLLM read the registry through the registry API only; the adapter folders vLLM loads are
this machine's verified cache of the server's files. One `pipeline serve` for the module (`mlflow_served`); the
replicated test starts its own. The last single-server test stops the MLflow server (SIGSTOP) under the running
server, so it runs after the others and continues it (SIGCONT) whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from registry import open_registry
from tests.mlflow_server import wipe
from tests.serve.adapters import PROMPT, make_adapters
from tests.serve.cli_server import free_port, start_cli
from tests.serve.test_server import MAX_TOKENS, _complete, _ids, _until_eos

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

LOOKUP_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def mlflow_served(mlflow_server, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-mlflow")
    wipe(mlflow_server)
    cache = root / "serve-cache"
    reg = open_registry(mlflow_server.uri, cache_dir=root / "publisher-cache")
    dirs, answers = make_adapters(tiny_model_dir, root, seeds=[1, 2], max_new_tokens=MAX_TOKENS)
    reg.publish(dirs[1], "alpha", base_dir=tiny_model_dir, alias="prod")
    reg.publish(dirs[2], "alpha", base_dir=tiny_model_dir)
    for name in ("flipped", "retagged"):  # tampered with on the MLflow server by the tests, before any load
        reg.publish(dirs[1], name, base_dir=tiny_model_dir)

    port = free_port()
    env = {"PIPELINE_REGISTRY_CACHE": str(cache), "MLFLOW_TRACKING_URI": ""}
    cli, _, _ = start_cli(["--registry", mlflow_server.uri, "--base", str(tiny_model_dir), "--port", str(port),
                           "--max-loras", "2", "--max-model-len", "256", "--kv-cache-gib", "0.0625", "--dtype",
                           "float32", "--served-name", "tiny-base", "--alias-ttl", "0.5",
                           "--lookup-timeout", str(LOOKUP_TIMEOUT_S)], env=env)
    try:
        yield {"url": f"http://127.0.0.1:{port}", "reg": reg, "answers": answers, "cache": cache, "cli": cli,
               "client": openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                       timeout=60),
               "eos": json.loads((tiny_model_dir / "generation_config.json").read_text())["eos_token_id"]}
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


def _post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict, float]:
    """(status, JSON answer, seconds it took)."""
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    return status, json.loads(raw), time.monotonic() - started


def _completion(model: str) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": 2, "temperature": 0}


def test_serves_from_an_mlflow_registry_and_follows_an_alias_move(mlflow_served):
    served = mlflow_served
    client, reg, answers, eos = served["client"], served["reg"], served["answers"], served["eos"]

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
    cached = sorted(p.name.split("-")[0] for p in served["cache"].glob("*/versions/alpha/*"))
    assert cached == ["1", "2"], cached
    assert not list(served["cache"].glob("*/.tmp/*"))


def test_versions_tampered_on_the_server_are_422_and_versions_past_its_range_404(mlflow_served, mlflow_server):
    """As the local store answers: a version whose files on the MLflow server no longer match its manifest, or
    whose manifest tag was rewritten after publishing, is 422 naming `pipeline registry verify` (was 400); a
    version number past what MLflow can store is 404 listing the versions (was 400 "retry" after an HTTP 500)."""
    from registry.mlflow_layout import MANIFEST_TAG, tags_of

    store = mlflow_served["reg"].store
    flipped = store._model_version("flipped", 1)
    weights = [p for p in mlflow_server.artifacts.rglob("adapter_model.safetensors") if flipped["run_id"] in str(p)]
    assert len(weights) == 1, weights
    data = bytearray(weights[0].read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    weights[0].write_bytes(bytes(data))
    retagged = store._model_version("retagged", 1)
    manifest = json.loads(tags_of(retagged)[MANIFEST_TAG])
    store.server.post("model-versions/set-tag", "rewriting a manifest tag",
                      {"name": "retagged", "version": "1", "key": MANIFEST_TAG, "value": json.dumps(manifest, indent=1)})

    for model in ("flipped@1", "flipped", "retagged@1"):
        status, body, _ = _post(mlflow_served["url"], _completion(model))
        message = body["error"]["message"]
        assert status == 422 and "verify" in message and model.split("@")[0] in message, (model, status, message)

    status, body, _ = _post(mlflow_served["url"], _completion("alpha@999999999999999999"))  # 18 digits
    assert status == 404 and "versions of `alpha`: 1-2" in body["error"]["message"], (status, body)
    status, body, _ = _post(mlflow_served["url"], _completion("nosuch@999999999999999999"))
    assert status == 404 and "does not exist" in body["error"]["message"], (status, body)


def test_a_stopped_registry_holds_up_nothing_already_resolved(mlflow_served, mlflow_server):
    """With the MLflow server stopped (SIGSTOP: connections open, nothing answers), a request for an unknown name
    gets 503 within --lookup-timeout while /health, the base model, a loaded version and an alias resolved
    before all answer at once (the alias and /v1/models as they were, with their age in the log). Before, the
    lookup ran on the event loop: it took 97 s, and nothing else answered in the meantime."""
    url = mlflow_served["url"]
    for model in ("alpha@1", "alpha@prod"):  # resolved and loaded while the registry answers
        assert _post(url, _completion(model))[0] == 200
    assert _get(url, "/v1/models")[0] == 200

    os.killpg(mlflow_server.proc.pid, signal.SIGSTOP)
    try:
        hung = {}
        ghost = threading.Thread(target=lambda: hung.update(answer=_post(url, _completion("ghost"), timeout=60)))
        ghost.start()
        time.sleep(0.5)  # the lookup of `ghost` now waits on the stopped server
        took = {"health": _get(url, "/health", timeout=30)}
        for what, model in [("base", "tiny-base"), ("alpha@1", "alpha@1"), ("alpha@prod", "alpha@prod")]:
            status, body, seconds = _post(url, _completion(model), timeout=30)
            took[what] = (status, body.get("model"), seconds)
        took["models"] = _get(url, "/v1/models", timeout=30)
        ghost.join(60)
        print(f"registry stopped: {took}; unknown name: {hung.get('answer')}")

        assert took["health"][0] == 200 and took["health"][2] < 2, took
        assert took["base"][:2] == (200, "tiny-base") and took["base"][2] < 10, took
        assert took["alpha@1"][:2] == (200, "alpha@1") and took["alpha@1"][2] < LOOKUP_TIMEOUT_S + 10, took
        assert took["alpha@prod"][:2] == (200, "alpha@2") and took["alpha@prod"][2] < LOOKUP_TIMEOUT_S + 10, took
        assert took["models"][0] == 200 and "alpha@prod" in took["models"][1], took
        status, body, seconds = hung["answer"]
        assert status == 503 and "did not answer within 3 s" in body["error"]["message"], hung
        assert LOOKUP_TIMEOUT_S - 0.5 < seconds < LOOKUP_TIMEOUT_S + 5, hung
    finally:
        os.killpg(mlflow_server.proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 120  # the registry is back: the next lookup answers (the hung ones time out)
    while True:
        status, body, _ = _post(url, _completion("ghost"))
        if status != 503 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert status == 404 and "ghost" in body["error"]["message"], (status, body)


def _get(url: str, path: str, timeout: float = 60) -> tuple[int, str, float]:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url + path, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    return status, raw.decode(errors="replace"), time.monotonic() - started
