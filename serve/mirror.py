"""Shadow traffic: a routed request is also sent to the route's mirror, whose answer is measured and dropped.

`pipeline registry route set NAME prod=100 --mirror canary`: every request for the bare `NAME` is answered by its
route's target as usual, and a copy of it (same body, `model` pinned to the mirror's version) goes through the
same app in the background. The copy never delays or alters the caller's answer: it runs as its own task on the
event loop, its response goes nowhere, and its outcome (status, time to first token, end-to-end time, tokens)
goes to the per-version metrics (serve/version_metrics.py `observe`) under `route_target="mirror:<target>"`.

Both serving modes do this in the middleware, which wraps vLLM's app (single server) and the ingress (replicas):
the copy re-enters the app below the middleware, so it is never counted twice, and it is never routed again.
At most MAX_IN_FLIGHT copies run at once: a slow mirror sheds its copies (counted in `dropped`) rather than
piling up work behind the versions that answer callers.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from dataclasses import dataclass

from serve.response_watch import ResponseWatch

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 64  # copies running at once; more are dropped (a mirror slower than the traffic it shadows)
MAX_KEPT_BODY = 1 << 20  # enough of the mirror's answer to read its token usage
# headers the copy must not carry: its length differs, and a caller's request id would name two engine requests
DROPPED_HEADERS = (b"content-length", b"x-request-id")
MIRROR_PREFIX = "mirror:"


@dataclass(frozen=True)
class MirrorOutcome:
    """One mirrored request, as the per-version metrics record it."""

    adapter: str
    version: int | None  # None when the mirror target could not be resolved
    route_target: str  # "mirror:<target>"
    status: int
    ttft_s: float | None  # to the first chunk when streamed, else end to end (None when it never ran)
    e2e_s: float
    prompt_tokens: int | None
    completion_tokens: int | None


class Mirror:
    """Sends copies of routed requests to the mirror target through `app` (the app below the middleware)."""

    def __init__(self, app, lookups, max_in_flight: int = MAX_IN_FLIGHT, report=None):
        self.app = app
        self.lookups = lookups
        self.max_in_flight = max_in_flight
        self.report = report or report_to_metrics
        self.dropped = 0
        self.sent = 0
        self._tasks: set[asyncio.Task] = set()

    def send(self, scope: dict, body: dict, name: str, target: str) -> None:
        """Start the copy of a request for `name` (its parsed `body`) to `name@target`; returns at once."""
        if len(self._tasks) >= self.max_in_flight:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("mirror of %s is behind: %d copies to %s@%s dropped so far (at most %d at once)",
                            name, self.dropped, name, target, self.max_in_flight)
            return
        self.sent += 1
        # a fresh context: the copy is no part of the caller's request. Inheriting it, the copy carried the
        # caller's Ray Serve request ids into the replicas' router, and the ingress stalled for seconds at a time
        task = asyncio.get_running_loop().create_task(self._copy(scope, body, name, target),
                                                      context=contextvars.Context())
        self._tasks.add(task)  # held: the event loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _copy(self, scope: dict, body: dict, name: str, target: str) -> None:
        from ground.errors import RegistryError
        from serve.resolver import error_status

        route_target = MIRROR_PREFIX + target
        started = time.monotonic()
        try:
            resolved = await self.lookups.pin(f"{name}@{target}")
        except RegistryError as exc:
            self._report(MirrorOutcome(name, None, route_target, int(error_status(exc)), None,
                                       time.monotonic() - started, None, None))
            return
        except Exception:  # nothing of the mirror may reach a caller, an exception included
            log.exception("mirror lookup of %s@%s failed", name, target)
            return
        payload = json.dumps({**body, "model": resolved.ref}).encode()
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in DROPPED_HEADERS]
        headers.append((b"content-length", str(len(payload)).encode()))
        copy_scope = {**scope, "headers": headers}
        answer = _Answer()
        started = time.monotonic()
        try:
            await self.app(copy_scope, _receive_once(payload), answer.send)
        except Exception:
            log.exception("mirror request to %s failed", resolved.ref)
            answer.status = answer.status or 500
        e2e_s = time.monotonic() - started
        # as the per-version metrics count the callers' requests: a whole answer's first token comes with its last
        ttft_s = answer.first_byte_at - started if answer.streamed and answer.first_byte_at else e2e_s
        prompt, completion = answer.usage()
        self._report(MirrorOutcome(resolved.name, resolved.version, route_target, answer.status or 500, ttft_s,
                                   e2e_s, prompt, completion))

    def _report(self, outcome: MirrorOutcome) -> None:
        try:
            self.report(outcome)
        except Exception:
            log.exception("could not record the mirror's outcome")


class _Answer(ResponseWatch):
    """The `send` of a mirrored request: notes status, first byte and (a bounded part of) the body; sends nothing."""

    def __init__(self):
        super().__init__(None, keep_bytes=MAX_KEPT_BODY)

    @property
    def first_byte_at(self) -> float | None:
        return self.first_chunk_at

    def usage(self) -> tuple[int | None, int | None]:
        """(prompt tokens, completion tokens) from the answer's `usage`: the JSON body, or the last SSE event
        that carries one (a stream has it with `stream_options.include_usage`)."""
        text = self.body
        candidates = [text] + [line[5:].strip() for line in reversed(text.split(b"\n")) if line.startswith(b"data:")]
        for candidate in candidates:
            try:
                usage = json.loads(candidate).get("usage")
            except (ValueError, AttributeError):
                continue
            if isinstance(usage, dict):
                return usage.get("prompt_tokens"), usage.get("completion_tokens")
        return None, None


def _receive_once(payload: bytes):
    """The copy's `receive`: its body, then nothing until it is done. A disconnect message would make vLLM
    abort the copy as if its caller had gone away."""
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await asyncio.Event().wait()  # never set: the copy's caller never leaves; the task ends with the answer

    return receive


def report_to_metrics(outcome: MirrorOutcome) -> None:
    """Count a mirrored request in the per-version metrics, as the middleware counts the callers' requests."""
    from serve import version_metrics

    version_metrics.observe(adapter=outcome.adapter, version=outcome.version, route_target=outcome.route_target,
                            status=outcome.status, ttft_s=outcome.ttft_s, e2e_s=outcome.e2e_s,
                            prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens)
