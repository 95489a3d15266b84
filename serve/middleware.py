"""ASGI middleware for vLLM's API server (`--middleware serve.middleware.RegistryRefMiddleware`).

It is the outermost layer of the app (vLLM adds `--middleware` classes last), so it sees every request first.
In order:
1. Access (serve/access.py): with an API key set, every route needs it except /health and /ping; routes that
   load adapters from a path or pick one by a header are closed (404) even with the key. Checked on the
   headers, before a byte of the body is read, so an anonymous caller can neither make the server buffer a
   body nor learn a registry name.
2. Bounded input: a body over `--max-body-mb` is refused with 413 as soon as its Content-Length, or the bytes
   streamed in so far, pass the limit. Every body but an upload to vLLM's audio routes (multipart) must be JSON:
   one without a JSON Content-Type (none, `text/plain`, a form) is a 400 here, as vLLM's own routes refuse it
   (the replicated ingress would parse it anyway, past the checks below: one rule for both modes). A body that
   does not parse (including a nesting so deep that the parser recurses out), nests deeper than MAX_JSON_DEPTH
   or is not an object is a 400, and so is `n` or `best_of` above `--max-n`. The replicated ingress is wrapped
   in this same middleware, so both modes refuse the same requests with the same status and message.
3. Pin moving references. A JSON request whose `model` is `NAME` or `NAME@ALIAS` is rewritten to the `NAME@V`
   it means now (looked up at most `ttl_s` ago). vLLM caches a resolved LoRA name forever, so without this an
   alias move would never reach `NAME@prod`; with it, requests already in flight keep their version (a
   distinct adapter to vLLM) and new requests get the new one, with no restart. The response's `model` field
   then says which version answered. A version deleted or changed in the registry since this server loaded it
   is refused here (404 / 422, see serve/verified.py), and so are unknown or invalid references (the caller
   holds the key by now, so the 404 may list what exists; names are cut to 80 characters). Lookups run off the
   event loop with a deadline (serve/lookups.py): a registry that does not answer costs the requests that need
   it a 503 after `--lookup-timeout`, while everything already resolved is served as before. A bare `NAME` with
   a traffic route in the registry goes to the target the route picks for this caller (serve/routing.py), and,
   when the route has a mirror, a copy of the request goes to the mirror in the background (serve/mirror.py).
4. Capture (serve/capture.py, `--capture DIR`, off by default): every answer gets an `x-request-id` header; an
   answered (200) chat or completion request is recorded before its answer is sent (a streamed one just before
   its `[DONE]` event, its other chunks passing on unheld), unless the
   caller opted out (`x-capture: off`, or `"capture": false` in the body, a field removed before vLLM sees it)
   or the sampling rate skipped it. `POST /v1/feedback` (serve/feedback.py) is answered here. With --replicas
   a caller's own `x-request-id` names its record, and one that feedback could not name is a 400.
5. List what can be served. A successful `GET /v1/models` lists the base and every servable reference from the
   registry (every version, `NAME` and each alias); adapters vLLM still holds but the registry no longer has
   are left out, and so are vLLM's paths.
"""

from __future__ import annotations

import json
import logging
import os

from serve.asgi_headers import header
from serve.capture import ENDPOINTS as CAPTURED_ENDPOINTS, REQUEST_ID_HEADER, STREAM_CAPTURE_BYTES, new_request_id
from serve.response_watch import ResponseWatch

log = logging.getLogger(__name__)

MAX_JSON_DEPTH = 128  # OpenAI requests (tool schemas included) nest a few dozen levels at most
BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")
ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               413: "RequestEntityTooLargeError", 422: "UnprocessableEntityError", 503: "ServiceUnavailableError"}
FORM_ROUTES = ("/v1/audio/",)  # the only routes that read a form (multipart uploads); every other body is JSON
COUNT_FIELDS = ("n", "best_of")  # completions generated per request: each costs a sequence in the batch
# set in a pinned request's scope: {"adapter", "version", "route_target" ("" unless routed), "mirror" (or None),
# "path" (the version's registry folder, for the capture's manifest digest)}
ROUTED_KEY = "lora_pipeline.answered_by"


class RequestRefused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class RegistryRefMiddleware:
    def __init__(self, app):
        from serve.access import AccessPolicy
        from serve.catalog import get_catalog
        from serve.lookups import RequestLookups
        from serve.mirror import Mirror
        from serve.server import (DEFAULT_LOOKUP_TIMEOUT_S, DEFAULT_MAX_BODY_MB, DEFAULT_MAX_N, ENV_LOOKUP_TIMEOUT,
                                  ENV_MAX_BODY_BYTES, ENV_MAX_N, ENV_RUN_DIR)

        self.app = app
        self.catalog = get_catalog()
        # vLLM's own --api-key argument is not used by `pipeline serve` (it would show in `ps`): the key comes
        # through VLLM_API_KEY, which vLLM's inner check reads as well
        self.access = AccessPolicy(os.environ.get("VLLM_API_KEY") or None)
        self.max_body = int(os.environ.get(ENV_MAX_BODY_BYTES) or DEFAULT_MAX_BODY_MB << 20)
        self.run_dir = os.environ.get(ENV_RUN_DIR)
        self.max_n = int(os.environ.get(ENV_MAX_N) or DEFAULT_MAX_N)
        timeout_s = float(os.environ.get(ENV_LOOKUP_TIMEOUT) or DEFAULT_LOOKUP_TIMEOUT_S)
        self.lookups = RequestLookups(self.catalog, timeout_s) if self.catalog is not None else None
        self.mirror = Mirror(app, self.lookups)  # a route's shadow traffic re-enters the app below this middleware
        from serve.auto_rollback import start_from_env

        self.auto_rollback = start_from_env(self.catalog)  # `--auto-rollback`: None unless it is on
        from serve.capture import Capture

        self.capture = Capture.from_env()  # `--capture DIR`: None unless it is on
        from serve.capture import ENV_PROXY_REQUEST_IDS

        self.proxy_request_ids = os.environ.get(ENV_PROXY_REQUEST_IDS) == "1"

    async def __call__(self, scope, receive, send):
        if self.catalog is None or scope["type"] not in ("http", "websocket", "lifespan"):
            return await self.app(scope, receive, send)
        if not self.access.bound and scope.get("app") is not None:
            self.access.bind(scope["app"], self.run_dir)  # at lifespan start-up: every route is mounted by then
        if scope["type"] == "lifespan" or self.access.is_public(scope):
            return await self.app(scope, receive, send)
        refusal = self.access.refusal(scope)
        if refusal is not None:
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})  # before accept: the handshake fails
            return await _error(send, *refusal)
        from serve import feedback, version_metrics

        if scope["type"] == "http" and scope["path"] == feedback.PATH:
            return await self._feedback(scope, receive, send)
        if scope["type"] == "http" and scope["method"] in BODY_METHODS:  # counted per version once pinned
            return await version_metrics.recorded(self._with_body, scope, receive, send, ROUTED_KEY)
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] in version_metrics.METRICS_PATHS:
            return await version_metrics.with_version_metrics(self.app, scope, receive, send)
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/v1/models":
            return await self._extend_models(scope, receive, send)
        return await self.app(scope, receive, send)

    # -------------------------------------------------------------------------------- 2. bounded body, 3. pin
    async def _with_body(self, scope, receive, send):
        refused_id = self._unrecordable_request_id(scope)
        if refused_id is not None:
            return await _error(send, 400, refused_id)
        declared = header(scope, b"content-length")
        # ASCII digits only: latin-1 headers may carry "²", which isdigit() accepts and int() refuses
        if declared is not None and (not declared.isascii() or not declared.isdigit() or int(declared) > self.max_body):
            return await _error(send, 413, self._too_large(declared))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away before sending the body
                return await self.app(scope, _replay([message], receive), send)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:  # chunked upload without a length: stop reading at the limit
                return await _error(send, 413, self._too_large(f"over {self.max_body}"))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            new_body, rewritten = await self._checked_body(scope, body)
        except RequestRefused as refused:
            return await _error(send, refused.status, str(refused))
        # every answer names its request, captured or not: the id `POST /v1/feedback` takes
        request_id = (header(scope, REQUEST_ID_HEADER) if self.proxy_request_ids else None) or new_request_id()
        id_header = [] if self.proxy_request_ids else [(REQUEST_ID_HEADER, request_id.encode())]
        plan = None
        if self.capture is not None:
            requested = _model_of(body) if rewritten else None
            plan, captured_body = self.capture.plan(scope, new_body, requested, request_id)
            rewritten = rewritten or captured_body is not new_body
            new_body = captured_body
        if rewritten:
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            scope["headers"].append((b"content-length", str(len(new_body)).encode()))
        routed = scope.get(ROUTED_KEY)
        if routed is not None and routed["mirror"]:  # after every refusal: a refused request is not mirrored
            self.mirror.send(scope, json.loads(body), routed["adapter"], routed["mirror"])
        replay = [{"type": "http.request", "body": new_body, "more_body": False}]
        if plan is None:
            return await self.app(scope, _replay(replay, receive), ResponseWatch(send, extra_headers=id_header).send)
        plan.routed = scope.get(ROUTED_KEY)
        if plan.streamed:
            return await self.app(scope, _replay(replay, receive), self._recording_stream(send, plan, id_header))

        async def recorded(watch):  # held until recorded: an answered request's record is on disk first
            body = watch.body
            if watch.status == 200:  # only answered requests are captured
                try:
                    body = await self.capture.answered(plan, watch)
                except Exception:  # the capture must never cost the caller its answer
                    log.exception("capture of request %s failed", request_id)
            await watch.replace(body)

        watch = ResponseWatch(send, hold=True, extra_headers=id_header, on_complete=recorded)
        return await self.app(scope, _replay(replay, receive), watch.send)

    def _recording_stream(self, send, plan, id_header):
        """A `send` for a streamed answer: every chunk goes on to the caller as it comes, except that the record is
        written just before the end of the stream (`data: [DONE]`) goes out. A client stops reading at [DONE] and
        may hang up before the response's closing message, so waiting for that message could record nothing."""
        kept = ResponseWatch(None, keep_bytes=STREAM_CAPTURE_BYTES + 1)  # status and events; sends nothing
        passed = ResponseWatch(send, extra_headers=id_header)
        recorded = False

        async def send_stream(message):
            nonlocal recorded
            await kept.send(message)
            last = message["type"] == "http.response.body" and (
                _ends_event_stream(message.get("body", b"")) or not message.get("more_body", False))
            if last and not recorded and kept.status == 200:
                recorded = True
                try:
                    await self.capture.answered_stream(plan, kept)
                except Exception:  # the capture must never cost the caller its answer
                    log.exception("capture of streamed request %s failed", plan.request_id)
            await passed.send(message)

        return send_stream

    async def _feedback(self, scope, receive, send):
        from serve import feedback

        try:
            status, payload = await feedback.handle(self.capture, scope, receive)
        except feedback.FeedbackRefused as refused:
            return await _error(send, refused.status, str(refused))
        return await _json_response(send, status, payload)

    def _unrecordable_request_id(self, scope) -> str | None:
        """With --replicas the capture records a request under the `x-request-id` Serve's proxy keeps, the caller's own
        when it sent one: an id feedback could never name (serve/feedback.py's REQUEST_ID) is refused, naming the
        header. Refused, not replaced as an edge proxy (Heroku's router, Envoy) would: the proxy sends the caller's id
        back itself, so a fresh id of ours would name a record the caller never learns of."""
        if not self.proxy_request_ids or self.capture is None or scope["path"] not in CAPTURED_ENDPOINTS:
            return None
        from serve.feedback import REQUEST_ID

        sent = header(scope, REQUEST_ID_HEADER)
        if sent is None or REQUEST_ID.fullmatch(sent):
            return None
        return (f"The `x-request-id` header {sent[:60]!r} cannot name a captured request: send 1 to 100 of the "
                "characters A-Z a-z 0-9 . _ : - (or no such header: the server then names the request itself).")

    def _too_large(self, declared: str) -> str:
        return (f"The request body ({declared[:20]} bytes) is larger than this server's limit of "
                f"{self.max_body >> 20} MiB (`pipeline serve --max-body-mb`).")

    async def _checked_body(self, scope, body: bytes) -> tuple[bytes, bool]:
        """(the body to pass on, whether it was rewritten). Raises RequestRefused."""
        content_type = (header(scope, b"content-type") or "").lower()
        if not body.strip() or (content_type.startswith("multipart/") and scope["path"].startswith(FORM_ROUTES)):
            return body, False  # no body, or an audio upload: vLLM's route checks its own format
        media_type = content_type.split(";")[0].strip()
        if not (media_type == "application/json" or media_type.endswith("+json")):
            # vLLM refuses these too, but the replicated ingress would parse them: refused here for both modes
            raise RequestRefused(400, f"Send the request body as JSON with `Content-Type: application/json` "
                                      f"(got {repr(media_type[:60]) if media_type else 'none'}).")
        data = self._parsed(body)
        model = data.get("model")
        if not isinstance(model, str) or not model or self.catalog.is_base(model):
            return body, False
        from ground.errors import RegistryError
        from serve.resolver import error_status
        from serve.routing import SESSION_HEADER, caller_key, choose, routed_name

        try:
            choice, name = None, routed_name(model)
            route = await self.lookups.route(name) if name is not None else None  # off the loop, like aliases
            if route is not None:
                choice = choose(route, name, caller_key(data, header(scope, SESSION_HEADER)))
            # off the event loop, with a deadline; stale while the registry is down
            resolved = await self.lookups.pin(choice.ref if choice else model)
        except RegistryError as exc:
            known = self.catalog.last_known(choice.ref if choice else model)  # its version, when it was resolved
            if choice is not None or known is not None:  # a refusal of a known version counts against it
                scope[ROUTED_KEY] = {"adapter": known[0].name if known else name,
                                     "version": known[0].version if known else None,
                                     "route_target": choice.target if choice else "", "mirror": None}
            raise RequestRefused(int(error_status(exc)), str(exc)) from None
        # what answers, for the per-version metrics and the mirror (the scope is this request's own: see caller)
        scope[ROUTED_KEY] = {"adapter": resolved.name, "version": resolved.version,
                             "route_target": choice.target if choice else "",
                             "mirror": choice.mirror if choice else None, "path": resolved.path}
        if resolved.ref == model:
            return body, False
        data["model"] = resolved.ref
        return json.dumps(data).encode(), True

    def _parsed(self, body: bytes) -> dict:
        """The body as a JSON object within the server's limits, or RequestRefused (400)."""
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser's stack
            raise RequestRefused(400, f"The request body is not valid JSON ({exc.__class__.__name__}: "
                                      f"{str(exc)[:120]}).") from None
        if _depth_over(data, MAX_JSON_DEPTH):
            raise RequestRefused(400, f"The request body nests JSON deeper than {MAX_JSON_DEPTH} levels.")
        if not isinstance(data, dict):
            raise RequestRefused(400, f"The request body must be a JSON object ({{...}}), not a JSON "
                                      f"{_json_kind(data)}.")
        for field in COUNT_FIELDS:
            count = _count(data.get(field))
            if count is not None and count > self.max_n:
                raise RequestRefused(400, f"`{field}` is {str(data[field])[:20]}, above this server's limit of "
                                          f"{self.max_n} completions per request (`pipeline serve --max-n`).")
        return data

    # -------------------------------------------------------------------------------- 5. list servable
    async def _extend_models(self, scope, receive, send):
        from serve.catalog import RegistryUnavailableError

        try:  # first: a registry that does not answer is a 503 here, not a listing without the registry
            cards = await self.lookups.servable()
        except RegistryUnavailableError as exc:
            return await _error(send, 503, f"Cannot list the registry's adapters: {exc}")
        except Exception:  # a listing problem must not take /v1/models down: the base model still answers
            log.exception("could not add registry adapters to /v1/models")
            cards = []
        async def extended(watch):
            await self._send_models(watch, cards)

        await self.app(scope, receive, ResponseWatch(send, hold=True, on_complete=extended).send)

    async def _send_models(self, watch, cards: list[dict]):
        body = watch.body
        if watch.status == 200:
            try:
                listing = json.loads(body)
                # vLLM's own cards: keep the base models; its adapter cards go (a version deleted from the
                # registry stays loaded in vLLM, and its card carries a server path): the registry says what exists
                bases = [card for card in listing.get("data", []) if not card.get("parent")]
                listing["data"] = bases + cards
                body = json.dumps(listing).encode()
            except Exception:  # a listing problem must not take /v1/models down; vLLM's own list still answers
                log.exception("could not add registry adapters to /v1/models")
        await watch.replace(body, status=watch.start.get("status", 500))


def _ends_event_stream(chunk: bytes) -> bool:
    """Whether `chunk` holds the stream's closing `data: [DONE]` event: a line of its own, not those characters
    inside a chunk's JSON (an answer may quote them, and recording there would see a stream cut off)."""
    return b"[DONE]" in chunk and any(line.strip() == b"data: [DONE]" for line in chunk.split(b"\n"))


def _model_of(body: bytes) -> str | None:
    """The `model` the caller sent (the body was checked: a JSON object)."""
    model = json.loads(body).get("model")
    return model if isinstance(model, str) else None


def _replay(messages: list[dict], receive):
    """A `receive` that hands out `messages` first, then defers to the real one (for disconnects)."""
    pending = list(messages)

    async def replayed():
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


def _json_kind(data) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(data), "number")


def _count(value) -> float | None:
    """`n` / `best_of` as vLLM's validation would read it (7, 7.0, "7"), or None when it is not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value.strip()[:30])
    return None


def _depth_over(data, limit: int) -> bool:
    """True when containers nest deeper than `limit` (iterative: a deep document must not recurse here)."""
    stack = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, (dict, list)))
    return False


async def _error(send, status: int, message: str) -> None:
    """An OpenAI-style error body, the shape vLLM's own errors have."""
    await _json_response(send, status, {"error": {"message": message, "type": ERROR_TYPES.get(status, "Error"),
                                                  "param": None, "code": status}})


async def _json_response(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
