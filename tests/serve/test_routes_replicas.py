"""Traffic routes with `pipeline serve --replicas 2` (Ray Serve, tiny model, vLLM CPU), driven by `openai`.

The ingress runs the same middleware as the single server, so the route is followed there: a request for the
bare `alpha` is pinned to the version its route target means before any replica sees it. Same registry as
tests/serve/test_routes.py: alpha 1 (prod), 2 (canary), 3 (latest).
"""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from registry import open_registry
from tests.serve.adapters import make_adapters
from tests.serve.cli_server import free_port
from tests.serve.route_checks import (FOLLOW_S, MAX_TOKENS, complete, metrics_text, route_change_under_load,
                                      same_answer, version_requests)
from tests.serve.test_replicas import replica_pids, start_replicated_cli

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

API_KEY = "route-replicas-key"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("routes-replicas")
    reg = open_registry(str(root / "registry"))
    dirs, answers = make_adapters(tiny_model_dir, root, seeds=[1, 2, 3], max_new_tokens=MAX_TOKENS)
    expected = {reg.publish(dirs[seed], "alpha", base_dir=tiny_model_dir).ref: answers[seed] for seed in (1, 2, 3)}
    reg.set_alias("alpha", "prod", 1)
    reg.set_alias("alpha", "canary", 2)
    port = free_port()
    cli = None
    try:
        cli, output = start_replicated_cli(
            ["--registry", str(root / "registry"), "--base", str(tiny_model_dir), "--port", str(port),
             "--replicas", "2", "--max-loras", "3", "--max-model-len", "256", "--kv-cache-gib", "0.0625",
             "--dtype", "float32", "--served-name", "tiny-base", "--alias-ttl", "1"],
            env={"PIPELINE_SERVE_API_KEY": API_KEY})
        url = f"http://127.0.0.1:{port}/v1"
        yield {"url": url, "registry": reg, "expected": expected,
               "client": openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=120)}
        cli.send_signal(signal.SIGINT)
        rest, _ = cli.communicate(timeout=180)
        assert cli.returncode == 0 and "stopping the server" in rest, output + rest
        deadline = time.monotonic() + 30
        while replica_pids() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert replica_pids() == {}
    finally:
        if cli is not None and cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()


@pytest.fixture
def clean_route(served):
    yield served["registry"]
    served["registry"].clear_route("alpha")


def test_route_change_and_clear_under_load_fail_no_request(served, clean_route):
    """As in the single server: 90/10 -> 50/50 -> cleared under 8 looping clients, nothing fails, and every
    request sent 2 s after a change follows the new route, with no restart of the ingress or the replicas."""
    route_change_under_load(served["client"], clean_route, served["expected"])


def test_a_mirror_answers_no_caller(served, clean_route):
    """prod=100 with canary as mirror: callers get prod's answer only; each request's copy reached a replica
    (the ingress counts every request a replica answered)."""
    client, expected, reg = served["client"], served["expected"], clean_route
    reg.set_route("alpha", {"prod": 100}, mirror="canary")
    complete(client, "alpha@2")  # loaded already: the first copies do not wait for a load
    time.sleep(FOLLOW_S)  # the cleared route of the test before may be reused for up to --alias-ttl
    before = _replica_requests(served["url"])
    counted = metrics_text(served["url"], API_KEY)
    users = [f"mirrored-{i}" for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda u: complete(client, "alpha", user=u), users))
    for model, ids in got:
        assert model == "alpha@1" and same_answer(ids, expected["alpha@1"]), (model, ids)
    started = time.monotonic()
    while _replica_requests(served["url"]) - before < 2 * len(users):
        assert time.monotonic() - started < 60, f"{_replica_requests(served['url']) - before} answered"
        time.sleep(0.5)
    assert _replica_requests(served["url"]) - before == 2 * len(users)
    # the per-version metrics count the copies apart from the callers' requests, exactly
    now = metrics_text(served["url"], API_KEY)
    assert version_requests(now, 2, "mirror:canary") - version_requests(counted, 2, "mirror:canary") == len(users)
    assert version_requests(now, 1, "prod") - version_requests(counted, 1, "prod") == len(users)
    assert version_requests(now, 2, "canary") == version_requests(counted, 2, "canary")


def _replica_requests(url: str) -> int:
    request = urllib.request.Request(url.removesuffix("/v1") + "/metrics",
                                     headers={"Authorization": f"Bearer {API_KEY}"})
    text = urllib.request.urlopen(request, timeout=30).read().decode()
    return sum(int(n) for n in re.findall(r"^pipeline_replica_requests_total\{[^}]*\} (\d+)$", text, re.M))
