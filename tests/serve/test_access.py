"""serve.access on a real Starlette app (no vLLM): what is public, closed or needs the key, and the route walk."""

from __future__ import annotations

import json

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route, WebSocketRoute

from serve.access import AccessPolicy, mounted_routes


async def _ok(request):
    return PlainTextResponse("ok")


async def _ws(websocket):
    await websocket.close()


def _app() -> Starlette:
    return Starlette(routes=[
        Route("/health", _ok), Route("/v1/completions", _ok, methods=["POST"]), Route("/metrics", _ok),
        Route("/adapters", _ok, methods=["POST"]), Route("/adapters/{name}", _ok, methods=["DELETE"]),
        Route("/invocations", _ok, methods=["POST"]), WebSocketRoute("/v1/realtime", _ws),
        Mount("/sub", routes=[Route("/brand-new", _ok)]),
    ])


def _scope(path: str, method: str = "GET", headers: dict | None = None) -> dict:
    return {"type": "http", "path": path, "method": method,
            "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}


def test_routes_are_walked_and_recorded(tmp_path):
    policy = AccessPolicy("k")
    policy.bind(_app(), str(tmp_path))
    table = {r["path"]: r for r in json.loads((tmp_path / "routes.json").read_text())}
    assert table["/sub/brand-new"]["access"] == "key"  # a route nobody listed is closed to anonymous callers
    assert table["/health"]["access"] == "public" and table["/metrics"]["access"] == "key"
    assert table["/adapters/{name}"]["access"] == "closed" and table["/invocations"]["access"] == "closed"
    assert table["/v1/realtime"]["kind"] == "websocket"
    assert policy.public == {"/health"}  # /ping is not mounted here, so it is not opened either
    assert {r["path"] for r in mounted_routes(_app())} == set(table)


def test_deny_by_default_and_closed_even_with_the_key():
    policy = AccessPolicy("secret")
    policy.bind(_app())
    key = {"Authorization": "Bearer secret"}
    assert policy.refusal(_scope("/health")) is None
    for path in ["/metrics", "/v1/completions", "/version", "/anything/new", "/adapters", "/ping"]:
        assert policy.refusal(_scope(path, "POST"))[0] == 401
        assert policy.refusal(_scope(path, "POST", {"Authorization": "Bearer wrong"}))[0] == 401
        assert policy.refusal(_scope(path, "POST", {"Authorization": "secret"}))[0] == 401  # no scheme
    assert policy.refusal(_scope("/metrics", headers=key)) is None
    for path in ["/adapters", "/adapters/alpha@1", "/invocations", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"]:
        status, message = policy.refusal(_scope(path, "POST", key))
        assert status == 404 and "registry" in message
    preflight = {"Origin": "https://x.example", "Access-Control-Request-Method": "POST"}
    assert policy.refusal(_scope("/v1/completions", "OPTIONS", preflight)) is None
    assert policy.refusal(_scope("/v1/completions", "OPTIONS"))[0] == 401


def test_without_a_key_only_the_closed_routes_are_refused():
    policy = AccessPolicy(None)
    policy.bind(_app())
    assert policy.refusal(_scope("/metrics")) is None
    assert policy.refusal(_scope("/adapters", "POST"))[0] == 404
