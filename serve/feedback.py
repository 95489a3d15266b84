"""`POST /v1/feedback`: a caller's judgement of a captured answer, appended to the capture's feedback shards.

Body: `{"request_id": "req-...", "score": 0.8}` or `{"request_id": "req-...", "label": "good" | "bad"}`, with an
optional `"comment"`. The request id is the `x-request-id` header of the answer. Answers: 200 with the stored
record; 400 naming the bad field; 404 for an id no capture holds (and whenever capture is off: the route does not
exist then); 503 when the feedback could not be written. Repeated feedback is appended: readers keep the last.
Served by the middleware (serve/middleware.py) behind the same API key as everything else.
"""

from __future__ import annotations

import asyncio
import json
import math
import re

PATH = "/v1/feedback"
LABELS = ("good", "bad")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,100}")  # ours (req-<hex>) or, with --replicas, Ray Serve's (a uuid)
MAX_BODY_BYTES = 64 << 10  # an id, a number and a comment
MAX_COMMENT_CHARS = 4000


class FeedbackRefused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_feedback(body: bytes) -> tuple[str, float | None, str | None, str | None]:
    """(request_id, score, label, comment) from a request body, or FeedbackRefused (400) naming the field."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise FeedbackRefused(400, "The feedback body is not valid JSON; send {\"request_id\": ..., \"score\": "
                                   "NUMBER} or {\"request_id\": ..., \"label\": \"good\"|\"bad\"}.") from None
    if not isinstance(data, dict):
        raise FeedbackRefused(400, "The feedback body must be a JSON object with `request_id` and `score` or `label`.")
    request_id = data.get("request_id")
    if not isinstance(request_id, str) or not REQUEST_ID.fullmatch(request_id):
        raise FeedbackRefused(400, f"`request_id` must be the `x-request-id` header of an answer, got "
                                   f"{str(request_id)[:60]!r}.")
    score, label, comment = data.get("score"), data.get("label"), data.get("comment")
    if score is None and label is None:
        raise FeedbackRefused(400, "Send `score` (a number) or `label` (\"good\" or \"bad\") with the request id.")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                              or not math.isfinite(score)):
        raise FeedbackRefused(400, f"`score` must be a finite number, got {str(score)[:40]!r}.")
    if label is not None and label not in LABELS:
        raise FeedbackRefused(400, f"`label` must be \"good\" or \"bad\", got {str(label)[:40]!r}.")
    if comment is not None and (not isinstance(comment, str) or len(comment) > MAX_COMMENT_CHARS):
        raise FeedbackRefused(400, f"`comment` must be a string of at most {MAX_COMMENT_CHARS} characters.")
    return request_id, None if score is None else float(score), label, comment


async def read_body(receive, limit: int = MAX_BODY_BYTES) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise FeedbackRefused(400, "The client went away before sending the feedback body.")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise FeedbackRefused(413, f"The feedback body is larger than {limit >> 10} KiB.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def handle(capture, scope, receive) -> tuple[int, dict]:
    """(status, JSON payload) of one `POST /v1/feedback`; `capture` is the server's Capture or None."""
    if capture is None:
        raise FeedbackRefused(404, "This server does not capture requests (`pipeline serve --capture DIR`), so it "
                                   "takes no feedback.")
    if scope["method"] != "POST":
        raise FeedbackRefused(405, "Send feedback with POST.")
    request_id, score, label, comment = parse_feedback(await read_body(receive))
    loop = asyncio.get_running_loop()
    if not await loop.run_in_executor(None, capture.known, request_id):  # may read the shards on disk
        raise FeedbackRefused(404, f"No captured request has the id {request_id!r} (ids come from the answers' "
                                   "`x-request-id` header; requests not captured take no feedback).")
    if not await loop.run_in_executor(None, capture.write_feedback, request_id, score, label, comment):
        raise FeedbackRefused(503, "The feedback could not be written to the capture folder; try again later.")
    return 200, {"object": "feedback", "request_id": request_id, "score": score, "label": label, "comment": comment}
