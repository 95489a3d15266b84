"""ASGI middleware for vLLM's API server (`--middleware serve.middleware.RegistryRefMiddleware`).

Three jobs, all about the registry:
1. Pin moving references. A JSON request whose `model` is `NAME` or `NAME@ALIAS` is rewritten to the `NAME@V`
   it means now (looked up at most `ttl_s` ago). vLLM caches a resolved LoRA name forever, so without this an
   alias move would never reach `NAME@prod`; with it, requests already in flight keep their version (a
   distinct adapter to vLLM) and new requests get the new one, with no restart. The response's `model` field
   then says which version answered. References that fail to resolve pass through unchanged, so the error is
   raised by the resolver inside vLLM, after vLLM's API-key check (no registry names leak to anonymous callers).
2. List what can be served. A successful `GET /v1/models` gets one card per servable reference appended
   (every version, `NAME` and each alias), not only the adapters vLLM has loaded so far.
3. Close `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`: the switch that enables resolvers also opens
   them, and they would let any client load an arbitrary server path. The registry is the only source here.
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)

BLOCKED_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
MAX_BODY_TO_PARSE = 64 << 20


class RegistryRefMiddleware:
    def __init__(self, app):
        from serve.catalog import get_catalog

        self.app = app
        self.catalog = get_catalog()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.catalog is None:
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if path in BLOCKED_PATHS:
            return await _json_response(send, 404, {"error": {
                "message": f"{path} is disabled by `pipeline serve`: adapters come from the registry. Publish with "
                           "`pipeline registry publish` and request `NAME`, `NAME@VERSION` or `NAME@ALIAS`.",
                "type": "NotFoundError", "param": None, "code": 404}})
        if method == "POST":
            return await self._rewrite_model(scope, receive, send)
        if method == "GET" and path == "/v1/models":
            return await self._extend_models(scope, receive, send)
        return await self.app(scope, receive, send)

    # -------------------------------------------------------------------------------- 1. pin references
    async def _rewrite_model(self, scope, receive, send):
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client went away before sending the body
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        new_body = self._pinned_body(body)
        if new_body is not body:
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            scope["headers"].append((b"content-length", str(len(new_body)).encode()))
        replay = [{"type": "http.request", "body": new_body, "more_body": False}]
        return await self.app(scope, _replay(replay, receive), send)

    def _pinned_body(self, body: bytes) -> bytes:
        if b'"model"' not in body or len(body) > MAX_BODY_TO_PARSE:
            return body
        try:
            data = json.loads(body)
        except ValueError:
            return body  # let vLLM report the malformed JSON
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, str) or not model or self.catalog.is_base(model):
            return body
        from ground.errors import RegistryError

        try:
            resolved = self.catalog.lookup(model)
        except RegistryError:
            return body  # the resolver raises the same error inside vLLM, after authentication
        if resolved.ref == model:
            return body
        data["model"] = resolved.ref
        return json.dumps(data).encode()

    # -------------------------------------------------------------------------------- 2. list servable
    async def _extend_models(self, scope, receive, send):
        start, parts = {}, []

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))
                if not message.get("more_body", False):
                    await self._send_models(send, start, b"".join(parts))

        await self.app(scope, receive, capture)

    async def _send_models(self, send, start, body: bytes):
        if start.get("status") == 200:
            try:
                listing = json.loads(body)
                loaded = {card.get("id") for card in listing.get("data", [])}
                listing["data"] += [c for c in self.catalog.servable() if c["id"] not in loaded]
                body = json.dumps(listing).encode()
            except Exception:  # a listing problem must not take /v1/models down; vLLM's own list still answers
                log.exception("could not add registry adapters to /v1/models")
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": start.get("status", 500), "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _replay(messages: list[dict], receive):
    """A `receive` that hands out `messages` first, then defers to the real one (for disconnects)."""
    pending = list(messages)

    async def replayed():
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


async def _json_response(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
