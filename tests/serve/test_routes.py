"""Traffic routes and mirrors in the single server (tiny model, vLLM CPU), driven by the official `openai` client.

`alpha` has three versions, each a distinct PEFT adapter: 1 (alias prod), 2 (alias canary), 3 (latest, no alias),
so every request's answer and `model` field say which version served it, and a bare `alpha` without a route
(latest) is told apart from both route targets. One server for the module, started with the real command.
The replicated twin of the route change is tests/serve/test_routes_replicas.py.
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
from tests.serve.cli_server import free_port, start_cli
from tests.serve.route_checks import (FOLLOW_S, MAX_TOKENS, binomial_interval, complete, expected_version,
                                      metrics_text, route_change_under_load, same_answer, version_requests)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

API_KEY = "route-key-789"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("routes")
    reg = open_registry(str(root / "registry"))
    dirs, answers = make_adapters(tiny_model_dir, root, seeds=[1, 2, 3], max_new_tokens=MAX_TOKENS)
    expected = {}
    for seed in (1, 2, 3):
        expected[reg.publish(dirs[seed], "alpha", base_dir=tiny_model_dir).ref] = answers[seed]
    assert len({tuple(ids[:2]) for ids in expected.values()}) == 3, "the three versions must answer differently"
    reg.set_alias("alpha", "prod", 1)
    reg.set_alias("alpha", "canary", 2)
    port = free_port()
    cli = None
    try:
        cli, server_pid, output = start_cli(
            ["--registry", str(root / "registry"), "--base", str(tiny_model_dir), "--port", str(port),
             "--max-loras", "3", "--max-model-len", "256", "--kv-cache-gib", "0.0625", "--dtype", "float32",
             "--served-name", "tiny-base", "--alias-ttl", "1"],
            env={"PIPELINE_SERVE_API_KEY": API_KEY})
        url = f"http://127.0.0.1:{port}/v1"
        yield {"url": url, "registry": reg, "expected": expected,
               "client": openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=60)}
        cli.send_signal(signal.SIGINT)
        rest, _ = cli.communicate(timeout=90)
        assert cli.returncode == 0 and "stopping the server" in rest, output + rest
    finally:
        if cli is not None and cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()


@pytest.fixture
def clean_route(served):
    yield served["registry"]
    served["registry"].clear_route("alpha")


def test_a_90_10_split_is_sticky_per_user_and_names_the_version(served, clean_route):
    """1,000 distinct `user`s: the canary's share is within the binomial 99.9% interval of 10%, each request
    went where Route.pick sends its user, its `model` names the version whose answer it carries, and the same
    user (or x-session-id) asked again gets the same version."""
    client, expected, reg = served["client"], served["expected"], clean_route
    route = reg.set_route("alpha", {"prod": 90, "canary": 10})
    time.sleep(FOLLOW_S)  # a route looked up before (by another test) may be reused for up to --alias-ttl
    users = [f"user-{i}" for i in range(1000)]
    with ThreadPoolExecutor(8) as pool:
        got = dict(zip(users, pool.map(lambda u: complete(client, "alpha", user=u), users)))
    for user, (model, ids) in got.items():
        assert same_answer(ids, expected[model]), f"{user}: {model} answered {ids}, not its own version's answer"
        assert model == expected_version(route.pick(user)), f"{user} went to {model}, not {route.pick(user)}"
    canary = sum(model == "alpha@2" for model, _ in got.values())
    low, high = binomial_interval(1000, 0.10, 0.999)
    assert low <= canary <= high, f"{canary} of 1000 on the canary, outside [{low}, {high}]"
    assert {model for model, _ in got.values()} == {"alpha@1", "alpha@2"}  # never the latest (alpha@3)

    again = users[:50] + [u for u in users if got[u][0] == "alpha@2"][:20]
    with ThreadPoolExecutor(8) as pool:
        repeat = list(pool.map(lambda u: complete(client, "alpha", user=u)[0], again))
    assert repeat == [got[u][0] for u in again]
    # the session header keys the split the same way when the body has no `user`
    for user in again[-20:]:
        assert complete(client, "alpha", session=user)[0] == got[user][0]
    # exact references stay exact whatever the route says
    assert complete(client, "alpha@prod", user=again[-1])[0] == "alpha@1"
    assert complete(client, "alpha@3", user=again[-1])[0] == "alpha@3"


def test_route_change_and_clear_under_load_fail_no_request(served, clean_route):
    """8 clients loop on `alpha` while the route goes 90/10 -> 50/50 -> cleared: no request fails, and every
    request sent 2 s after a change follows the new route (its user's pick; the latest version once cleared)."""
    route_change_under_load(served["client"], clean_route, served["expected"])


def test_a_mirror_answers_no_caller(served, clean_route):
    """prod=100 with canary as mirror: every caller gets prod's answer; the canary answered a copy of each request
    (vLLM's finished-request counter grows by two per request)."""
    client, expected, reg = served["client"], served["expected"], clean_route
    reg.set_route("alpha", {"prod": 100}, mirror="canary")
    complete(client, "alpha@2")  # loaded already: the mirror's first copy does not wait for a load
    time.sleep(FOLLOW_S)  # the cleared route of the test before may be reused for up to --alias-ttl
    before = _finished_requests(served["url"])
    counted = metrics_text(served["url"], API_KEY)
    users = [f"mirrored-{i}" for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda u: complete(client, "alpha", user=u), users))
    for model, ids in got:
        assert model == "alpha@1" and same_answer(ids, expected["alpha@1"]), (model, ids)
    started = time.monotonic()
    while _finished_requests(served["url"]) - before < 2 * len(users):
        assert time.monotonic() - started < 60, (
            f"{_finished_requests(served['url']) - before} finished engine requests for {len(users)} mirrored")
        time.sleep(0.5)
    assert _finished_requests(served["url"]) - before == 2 * len(users)
    # the per-version metrics count the copies apart from the callers' requests, exactly
    now = metrics_text(served["url"], API_KEY)
    assert version_requests(now, 2, "mirror:canary") - version_requests(counted, 2, "mirror:canary") == len(users)
    assert version_requests(now, 1, "prod") - version_requests(counted, 1, "prod") == len(users)
    assert version_requests(now, 2, "canary") == version_requests(counted, 2, "canary")


def _finished_requests(url: str) -> int:
    """vLLM's own count of finished engine requests (every reason), from /metrics."""
    request = urllib.request.Request(url.removesuffix("/v1") + "/metrics",
                                     headers={"Authorization": f"Bearer {API_KEY}"})
    text = urllib.request.urlopen(request, timeout=30).read().decode()
    return int(sum(float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} ([0-9.e+]+)$", text, re.M)))
