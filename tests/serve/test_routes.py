"""Traffic routes and mirrors in the single server (tiny model, vLLM CPU), driven by the official `openai` client.

`alpha` has three versions, each a distinct PEFT adapter: 1 (alias prod), 2 (alias canary), 3 (latest, no alias),
so every request's answer and `model` field say which version served it, and a bare `alpha` without a route
(latest) is told apart from both route targets. The server is the real command, shared with
the other modules of tests/serve/conftest.py, which never route `alpha`.
The replicated twin of the route change is tests/serve/test_routes_replicas.py.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from registry import open_registry
from tests.serve.route_checks import (FOLLOW_S, binomial_interval, complete, expected_version,
                                      mirror_answers_no_caller, route_change_under_load, same_answer)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="module")
def served(shared_servers, shared_server):
    expected = shared_servers.alpha()
    server = shared_server.ensure_started()
    yield {"url": server.url, "api_key": server.api_key, "registry": open_registry(str(server.registry_dir)),
           "expected": expected, "client": server.client()}


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
    mirror_answers_no_caller(served["client"], clean_route, served["url"], served["api_key"], served["expected"],
                             users=40, answered_metric="vllm:request_success_total")
