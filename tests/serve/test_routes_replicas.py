"""Traffic routes with `pipeline serve --replicas 2` (Ray Serve, tiny model, vLLM CPU), driven by `openai`.

The ingress runs the same middleware as the single server, so the route is followed there: a request for the
bare `alpha` is pinned to the version its route target means before any replica sees it. Same registry as
tests/serve/test_routes.py: alpha 1 (prod), 2 (canary), 3 (latest). The server is the shared `--replicas 2`
(tests/serve/conftest.py), stopped with Ctrl-C after its last module, leaving no replica process.
"""

from __future__ import annotations

import pytest

from registry import open_registry
from tests.serve.route_checks import mirror_answers_no_caller, route_change_under_load

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="module")
def served(shared_servers, shared_replicated_server):
    expected = shared_servers.alpha()
    server = shared_replicated_server.ensure_started()
    yield {"url": server.url, "api_key": server.api_key, "registry": open_registry(str(server.registry_dir)),
           "expected": expected, "client": server.client(timeout=120)}


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
    mirror_answers_no_caller(served["client"], clean_route, served["url"], served["api_key"], served["expected"],
                             users=24, answered_metric="pipeline_replica_requests_total")
