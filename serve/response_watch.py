"""One wrapper for an ASGI `send` that watches a response: its status, when its first and last bytes went, and
(some of) its body.

Several layers of the server need to see a response on its way out: the per-version metrics (status, timings,
the `usage` in the body's tail), the mirror (the body of an answer nobody receives), `/metrics` and `/v1/models`
(the whole body, to extend it before it is sent) and the capture (the whole answer, to record it and to take
out the token ids the caller did not ask for). They all use `ResponseWatch`:

- `send=None` drops the response (the mirror's copies); otherwise messages go on to `send` as they come,
- `hold=True` keeps the start and every body chunk back; `on_complete` then sends what it wants (`replace`),
- `keep_bytes` keeps the body's first bytes (everything when holding), `tail_bytes` its last bytes,
- `extra_headers` are added to the response's start message when it is passed on.
"""

from __future__ import annotations

import time


class ResponseWatch:
    def __init__(self, send=None, *, hold: bool = False, keep_bytes: int = 0, tail_bytes: int = 0,
                 extra_headers: list[tuple[bytes, bytes]] | None = None, on_complete=None):
        self._send = send
        self.hold = hold
        self.keep_bytes = keep_bytes
        self.tail_bytes = tail_bytes
        self.extra_headers = list(extra_headers or [])
        self.on_complete = on_complete  # async callable(watch), called once the last body chunk arrived
        self.start: dict = {}
        self.status = 0
        self.streamed = False
        self.first_chunk_at: float | None = None
        self.finished_at: float | None = None
        self.parts: list[bytes] = []
        self.kept = 0
        self.tail = b""

    @property
    def body(self) -> bytes:
        return b"".join(self.parts)

    async def send(self, message: dict) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.start = message
            self.status = int(message.get("status", 500))
            content_type = dict((k.lower(), v) for k, v in message.get("headers", [])).get(b"content-type", b"")
            self.streamed = content_type.startswith(b"text/event-stream")
            if self.extra_headers:
                message = {**message, "headers": list(message.get("headers", [])) + self.extra_headers}
        elif kind == "http.response.body":
            chunk = message.get("body", b"")
            if chunk and self.first_chunk_at is None:
                self.first_chunk_at = time.monotonic()
            if self.hold or self.kept < self.keep_bytes:
                self.parts.append(chunk)
                self.kept += len(chunk)
            if self.tail_bytes:
                self.tail = (self.tail + chunk)[-self.tail_bytes:]
            if not message.get("more_body", False):
                self.finished_at = time.monotonic()
                if not self.hold and self._send is not None:
                    await self._send(message)  # passed on before on_complete: the caller is not kept waiting
                    message = None
                if self.on_complete is not None:
                    await self.on_complete(self)
                if message is None:
                    return
        if self._send is None or (self.hold and kind in ("http.response.start", "http.response.body")):
            return
        await self._send(message)

    async def replace(self, body: bytes, status: int | None = None,
                      headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """Send a held response as `body`: the original start's headers (with a new length, `extra_headers`
        and `headers` added) and the body in one message."""
        kept = [(k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"]
        kept += self.extra_headers + list(headers or [])
        kept.append((b"content-length", str(len(body)).encode()))
        await self._send({"type": "http.response.start", "status": status or self.start.get("status", 500),
                          "headers": kept})
        await self._send({"type": "http.response.body", "body": body, "more_body": False})
