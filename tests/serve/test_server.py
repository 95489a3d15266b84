"""A real multi-adapter server on loopback (tiny model, vLLM CPU) driven by the official `openai` client.

One server for the whole module (start takes ~30 s on 2 cores), started with the real `pipeline serve`
command and stopped with a Ctrl-C (SIGINT), after which no process and no shared memory of it may remain.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from registry import open_registry
from ground.processes import shm_segments_of
from serve.server import session_pids
from ground.model_files import check_safetensors, fingerprint
from tests.serve.adapters import PROMPT, make_adapters
from tests.serve.cli_server import free_port, server_env, start_cli
from tests.tiny_model import build_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

API_KEY = "test-key-123"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("serve")
    reg = open_registry(str(root / "registry"))
    # alpha@1, alpha@2 (alias prod -> 1), beta@1, gamma@1: each a distinct PEFT adapter
    dirs, answers = make_adapters(tiny_model_dir, root, seeds=[1, 2, 3, 4], max_new_tokens=MAX_TOKENS)
    expected = {"base": answers[None]}
    for seed, name in zip([1, 2, 3, 4], ["alpha", "alpha", "beta", "gamma"]):
        expected[reg.publish(dirs[seed], name, base_dir=tiny_model_dir).ref] = answers[seed]
    reg.set_alias("alpha", "prod", 1)
    other_base = build_tiny_model(root / "other-base", seed=7)
    foreign, _ = make_adapters(other_base, root / "foreign", seeds=[9], max_new_tokens=1)
    reg.publish(foreign[9], "foreign", base_dir=other_base)
    # a host-memory tier budget that holds 6.5 of these (equally sized) adapters in float32: the server must
    # keep 6 loaded (--max-cpu-loras 6), more than its 4 slots
    per_adapter = _tensor_elements(dirs[1] / "adapter_model.safetensors") * 4
    lora_cache_gib = 6.5 * per_adapter / (1 << 30)

    # the real command, as a user runs it; its teardown below is a Ctrl-C
    port = free_port()
    server, cli = {}, None
    try:
        cli, server_pid, output = start_cli(
            ["--registry", str(root / "registry"), "--base", str(tiny_model_dir), "--port", str(port),
             "--max-loras", "4", "--max-model-len", "256", "--kv-cache-gib", "0.0625", "--dtype", "float32",
             "--served-name", "tiny-base", "--alias-ttl", "1", "--lora-cache-gib", repr(lora_cache_gib)],
            env={"PIPELINE_SERVE_API_KEY": API_KEY})
        segments = shm_segments_of(session_pids(server_pid))
        url = f"http://127.0.0.1:{port}/v1"
        server.update(cli=cli, url=url, server_pid=server_pid, output=output, base_name="tiny-base",
                      base_dir=tiny_model_dir, registry=reg, expected=expected, other_base=other_base, root=root,
                      client=openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=60))
        yield server

        cli.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal delivers to the command
        rest, _ = cli.communicate(timeout=90)
        assert cli.returncode == 0 and "stopping the server" in rest, output + rest
        # clean shutdown: no process of the server's session, none of its shared-memory segments left behind
        assert session_pids(server_pid) == []
        assert segments and not any(os.path.exists(s) for s in segments)
    finally:
        if cli is not None and cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()


def _tensor_elements(path) -> int:
    header = check_safetensors(path)
    return sum(math.prod(meta["shape"]) for key, meta in header.items() if key != "__metadata__")


def _complete(client, model: str, max_tokens: int = MAX_TOKENS):
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                     extra_body={"return_token_ids": True})


def _ids(choice) -> list[int]:
    return list(choice.model_extra["token_ids"])


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def test_host_memory_tier_is_sized_from_the_budget_and_the_adapters(served):
    with open(f"/proc/{served['server_pid']}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")
    assert argv[argv.index("--max-loras") + 1] == "4"
    assert argv[argv.index("--max-cpu-loras") + 1] == "6", argv
    assert "host-memory adapter tier: max_cpu_loras=6 (" in served["output"], served["output"]


def test_the_engines_of_a_server_run_without_the_merged_weight_lora_path(served):
    """A server switching among adapters would rebuild merged weights at every switch (serve/server.py says why):
    its engine, and every replica's, starts with the merged path off unless the environment says otherwise."""
    from ground.vllm_cpu_lora_merged import SLOTS_ENV
    from serve.replicas.replica import ENGINE_ENV

    assert server_env(served["server_pid"]).get(SLOTS_ENV) == "0"
    assert ENGINE_ENV.get(SLOTS_ENV) == "0"


def test_each_adapter_and_the_base_answer_with_their_own_weights(served):
    client, expected = served["client"], served["expected"]
    eos = json.loads((served["base_dir"] / "generation_config.json").read_text())["eos_token_id"]
    answers = {}
    for model, key in [("tiny-base", "base"), ("alpha@1", "alpha@1"), ("alpha@2", "alpha@2"), ("alpha", "alpha@2"),
                       ("alpha@prod", "alpha@1"), ("beta", "beta@1"), ("gamma@1", "gamma@1")]:
        resp = _complete(client, model)
        ids = _until_eos(_ids(resp.choices[0]), eos)
        assert ids == _until_eos(expected[key], eos), f"{model}: server {ids} != PEFT {expected[key]}"
        # the response names the pinned version that answered
        assert resp.model == ("tiny-base" if key == "base" else key)
        answers[key] = tuple(ids)
    assert len(set(answers.values())) == 5, f"adapters and base must answer differently: {answers}"


def test_chat_and_streaming_requests_are_pinned_too(served):
    client = served["client"]
    chat = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=4, temperature=0)
    assert chat.model == "beta@1"
    chunks = list(client.chat.completions.create(model="gamma@latest", messages=[{"role": "user", "content": PROMPT}],
                                                 max_tokens=4, temperature=0, stream=True))
    assert chunks and {c.model for c in chunks} == {"gamma@1"}


def test_models_lists_base_and_every_servable_reference(served):
    ids = [m.id for m in served["client"].models.list().data]
    assert ids[0] == "tiny-base"
    for ref in ["alpha@1", "alpha@2", "alpha", "alpha@prod", "beta@1", "beta", "gamma@1", "gamma"]:
        assert ref in ids
    assert not any(i.startswith("foreign") for i in ids)  # trained on another base: not servable here


def test_unknown_adapter_is_404_listing_what_exists(served):
    with pytest.raises(openai.NotFoundError) as info:
        _complete(served["client"], "nope")
    assert info.value.status_code == 404
    assert "`nope` does not exist" in str(info.value) and "alpha, beta, foreign, gamma" in str(info.value)
    with pytest.raises(openai.NotFoundError, match="versions of `alpha`: 1-2"):
        _complete(served["client"], "alpha@99")


def test_name_is_never_a_path(served):
    for bad in ["../registry/adapters/alpha/versions/1", "/etc", "alpha/../beta"]:
        with pytest.raises(openai.BadRequestError, match="Invalid adapter name"):
            _complete(served["client"], bad)


def test_adapter_for_another_base_is_refused_naming_both(served):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        _complete(served["client"], "foreign")
    message = str(info.value)
    assert info.value.status_code == 422
    assert fingerprint(served["other_base"])[:16] in message
    assert served["base_name"] in message


def test_api_key_is_required_but_health_stays_open(served):
    url = served["url"]
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).completions.create(
            model="alpha", prompt=PROMPT, max_tokens=2)
    assert info.value.status_code == 401
    request = urllib.request.Request(url + "/completions", data=json.dumps({"model": "alpha", "prompt": "x"}).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as no_key:
        urllib.request.urlopen(request, timeout=30)
    assert no_key.value.code == 401
    root = url.removesuffix("/v1")
    assert urllib.request.urlopen(root + "/health", timeout=30).status == 200
    with pytest.raises(urllib.error.HTTPError) as anonymous_metrics:  # its labels name the loaded adapters
        urllib.request.urlopen(root + "/metrics", timeout=30)
    assert anonymous_metrics.value.code == 401
    keyed = urllib.request.Request(root + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert "vllm:" in urllib.request.urlopen(keyed, timeout=30).read().decode()


def test_runtime_load_routes_are_closed(served):
    body = json.dumps({"lora_name": "x", "lora_path": "/etc"}).encode()
    request = urllib.request.Request(served["url"] + "/load_lora_adapter", data=body, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == 404 and b"disabled" in info.value.read()


def test_alias_move_under_load_fails_no_request(served):
    """8 client threads loop on alpha@prod while prod moves 1 -> 2: every request succeeds with v1's or v2's
    answer, and requests sent after the move (plus the 1 s alias TTL) all get v2. No restart."""
    from click.testing import CliRunner

    from registry.cli import registry_cli

    client, expected = served["client"], served["expected"]
    answers = {tuple(expected["alpha@1"]): "alpha@1", tuple(expected["alpha@2"]): "alpha@2"}
    results, errors, stop = [], [], threading.Event()
    moved_at = []

    def worker():
        while not stop.is_set():
            sent = time.monotonic()
            try:
                resp = _complete(client, "alpha@prod", max_tokens=MAX_TOKENS)
                results.append((sent, time.monotonic(), resp.model, tuple(_ids(resp.choices[0]))))
            except Exception as exc:  # any failure is a test failure, reported below
                errors.append(repr(exc))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        moved_at.append(time.monotonic())
        out = CliRunner().invoke(registry_cli, ["--registry", str(served["root"] / "registry"),
                                                "alias", "set", "alpha", "prod", "2"])
        assert out.exit_code == 0, out.output
        moved_at.append(time.monotonic())  # the alias file is replaced somewhere between these two instants
        deadline = moved_at[1] + 15
        while time.monotonic() < deadline:
            late = [r for r in results if r[0] > moved_at[1] + 2.0]
            if len(late) >= 16:
                break
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors[:3]
    assert results
    for _, _, model, ids in results:
        assert model in ("alpha@1", "alpha@2")
        assert answers.get(ids) == model, f"{model} answered {ids}, not its own version's answer"
    # answered before the move began: the old version; sent over 2 s after it ended (TTL 1 s): the new one
    before = [m for _, done, m, _ in results if done < moved_at[0]]
    after = [m for sent, _, m, _ in results if sent > moved_at[1] + 2.0]
    assert before and set(before) == {"alpha@1"}
    assert len(after) >= 16 and set(after) == {"alpha@2"}, f"{len(after)} late requests: {set(after)}"
