"""Route following and mirrors without a server: which requests follow a route, the route lookup's TTL and
stale-while-error (serve/catalog.py, serve/lookups.py), and the mirror's copy (serve/mirror.py) against a small
ASGI app. The real server with the `openai` client: tests/serve/test_routes.py and test_routes_replicas.py."""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
import time

import pytest

from ground.model_files import fingerprint
from registry import open_registry
from registry.mlflow_http import ServerUnavailableError
from serve.catalog import AdapterCatalog, RegistryUnavailableError
from serve.lookups import RequestLookups
from serve.mirror import Mirror
from serve.routing import caller_key, routed_name
from tests.synthetic_lora import write_lora


@pytest.mark.parametrize("model, name", [
    ("alpha", "alpha"), ("models:/alpha", "alpha"), ("latest", "latest"),
    ("alpha@prod", None), ("alpha@7", None), ("alpha@latest", None), ("models:/alpha/7", None),
    ("models:/alpha@prod", None), ("../x", None), ("", None)])
def test_only_the_bare_name_follows_a_route(model, name):
    assert routed_name(model) == name


def test_the_caller_key_is_the_user_field_then_the_session_header():
    assert caller_key({"user": "u1"}, "s1") == "u1"
    assert caller_key({"user": ""}, "s1") == "s1"
    assert caller_key({"user": 7}, "s1") == "s1"
    assert caller_key({}, None) is None


class FlakyRoutes:
    """A real registry whose `get_route` can be made to hang or fail, counting its calls."""

    def __init__(self, registry):
        self.registry = registry
        self.release = threading.Event()
        self.hang = False
        self.fail: Exception | None = None
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.registry, name)

    def get_route(self, name):
        self.calls += 1
        if self.hang:
            self.release.wait(30)
        if self.fail is not None:
            raise self.fail
        return self.registry.get_route(name)


@pytest.fixture
def routes(tmp_path, tiny_model_dir):
    reg = open_registry(str(tmp_path / "reg"))
    reg.publish(write_lora(tmp_path / "a1", seed=1), "alpha", base_dir=tiny_model_dir, alias="prod")
    reg.publish(write_lora(tmp_path / "a2", seed=2), "alpha", base_dir=tiny_model_dir, alias="canary")
    flaky = FlakyRoutes(reg)
    yield flaky, AdapterCatalog(flaky, fingerprint(tiny_model_dir), "tiny", ttl_s=0.2)
    flaky.release.set()


def test_a_route_change_is_seen_after_the_ttl_and_the_last_route_serves_while_the_registry_is_down(routes):
    registry, catalog = routes

    async def scenario():
        lookups = RequestLookups(catalog, timeout_s=0.5)
        assert await lookups.route("alpha") is None
        assert await lookups.route("ghost") is None  # no such adapter: its own lookup answers the 404
        registry.set_route("alpha", {"prod": 90, "canary": 10})
        assert await lookups.route("alpha") is None  # within the TTL: the answer of a moment ago
        calls = registry.calls
        await asyncio.sleep(0.25)
        route = await lookups.route("alpha")
        assert dict(route.targets) == {"prod": 90, "canary": 10} and registry.calls == calls + 1
        await asyncio.gather(*(lookups.route("alpha") for _ in range(20)))
        assert registry.calls == calls + 1  # one lookup per TTL, however many requests

        await asyncio.sleep(0.25)
        registry.fail = ServerUnavailableError("connection refused")
        stale = await lookups.route("alpha")  # the registry is down: the last route, not a 503
        assert dict(stale.targets) == {"prod": 90, "canary": 10}
        registry.fail, registry.hang = None, True
        await asyncio.sleep(0.6)  # past the lookup timeout since the failure: the next lookup waits, then stale
        started = time.monotonic()
        assert (await lookups.route("alpha")).revision == route.revision
        assert time.monotonic() - started < 1.5
        with pytest.raises(RegistryUnavailableError, match="did not answer within 0.5 s"):
            await lookups.route("beta")  # never looked up: nothing to serve stale
        registry.hang = False
        registry.release.set()

    asyncio.run(scenario())


CALLERS_REQUEST = contextvars.ContextVar("callers_request")  # stands for Ray Serve's request context


class SlowApp:
    """An ASGI app that answers after `delay_s`, recording what it was sent."""

    def __init__(self, delay_s: float, status: int = 200):
        self.delay_s = delay_s
        self.status = status
        self.seen: list[tuple[dict, dict]] = []
        self.disconnects = 0
        self.contexts: list = []

    async def __call__(self, scope, receive, send):
        body = json.loads((await receive())["body"])
        self.seen.append((scope, body))
        self.contexts.append(CALLERS_REQUEST.get(None))
        listen = asyncio.create_task(receive())  # as vLLM does: a disconnect would abort the request
        await asyncio.sleep(self.delay_s)
        if listen.done():
            self.disconnects += 1
        listen.cancel()
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(
            {"model": body["model"], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}).encode()})


class PinOnly:
    async def pin(self, ref):
        from serve.catalog import Resolved

        name, _, target = ref.partition("@")
        return Resolved(ref=f"{name}@{2 if target == 'canary' else 1}", name=name, version=2 if target == "canary" else 1,
                        path="", base_fingerprint=None)


def test_a_mirror_copy_returns_at_once_and_reports_its_outcome():
    outcomes = []
    app = SlowApp(delay_s=0.3)
    mirror = Mirror(app, PinOnly(), max_in_flight=2, report=outcomes.append)
    scope = {"type": "http", "method": "POST", "path": "/v1/completions",
             "headers": [(b"content-length", b"99"), (b"x-request-id", b"r1"), (b"authorization", b"Bearer k")]}

    async def scenario():
        CALLERS_REQUEST.set("request-1")
        started = time.monotonic()
        for _ in range(3):  # the third is over the limit: dropped, not queued
            mirror.send(scope, {"model": "alpha", "prompt": "hi", "user": "u"}, "alpha", "canary")
        assert time.monotonic() - started < 0.05  # the caller never waits for the copy
        while mirror._tasks:
            await asyncio.sleep(0.05)

    asyncio.run(scenario())
    assert (mirror.sent, mirror.dropped) == (2, 1)
    assert [body["model"] for _, body in app.seen] == ["alpha@2", "alpha@2"]
    assert app.disconnects == 0
    assert app.contexts == [None, None]  # the copy is no part of the caller's request (its ids, its lifetime)
    headers = dict(app.seen[0][0]["headers"])
    assert b"x-request-id" not in headers and headers[b"authorization"] == b"Bearer k"
    assert int(headers[b"content-length"]) == len(json.dumps({**app.seen[0][1]}).encode())
    outcome = outcomes[0]
    assert (outcome.adapter, outcome.version, outcome.route_target, outcome.status) == ("alpha", 2, "mirror:canary", 200)
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (5, 3)
    assert 0.25 < outcome.e2e_s < 2 and outcome.ttft_s == outcome.e2e_s  # a whole answer: TTFT is end to end
