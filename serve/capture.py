"""Capture: what each adapter version was asked and answered, written as append-only JSONL shards.

`pipeline serve --capture DIR` (config: serve.capture.*). The record format is the shared one of
`ground/capture_records.py`'s readers (docs/serving.md, "Capture and feedback"); the folder and its shards are
serve/capture_files.py's (every line fsynced before the caller gets its answer, never rewritten). The folder is checked when the server starts (created 0700, writable, with free space): a
capture that cannot work is refused then, by name. A write that fails later never fails the caller's request:
the record is counted as lost in /metrics (`lora_pipeline_capture_records_lost_total`) and logged once.

The settings reach the server process (single vLLM server or the replicated ingress, where the middleware runs)
through environment variables, like the other middleware settings. A streamed answer is recorded from its
chunks just before its `[DONE]` goes to the caller (`_assembled`).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import logging
import os
import random
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ground.capture_records import utc_now
from ground.capture_settings import CLI_SOURCE, setting_name
from ground.errors import StageError
from serve.asgi_headers import header
from serve.capture_files import ShardWriter, prepare_folder

log = logging.getLogger(__name__)

ENV_DIR = "PIPELINE_SERVE_CAPTURE_DIR"
ENV_RATE = "PIPELINE_SERVE_CAPTURE_RATE"
ENV_REDACT = "PIPELINE_SERVE_CAPTURE_REDACT"  # a JSON list of regular expressions
ENV_REDACT_HOOK = "PIPELINE_SERVE_CAPTURE_REDACT_HOOK"
ENV_MAX_SHARD_MB = "PIPELINE_SERVE_CAPTURE_MAX_SHARD_MB"
# "1" in the replicated ingress: the proxy in front (Ray Serve) names each request in its `x-request-id` header and
# sends that header back itself, so the capture takes the id from the request instead of minting one
ENV_PROXY_REQUEST_IDS = "PIPELINE_SERVE_PROXY_REQUEST_IDS"

RECORD_FORMAT = 1
DEFAULT_MAX_SHARD_MB = 64.0
REDACTED = "[REDACTED]"
OPT_OUT_HEADER = b"x-capture"
OPT_OUT_FIELD = "capture"
REQUEST_ID_HEADER = b"x-request-id"
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
METRIC_PREFIX = "lora_pipeline_capture_"
STREAM_CAPTURE_BYTES = 16 << 20  # of a streamed answer's events kept for its record (chunk JSON is ~20x its text)


def new_request_id() -> str:
    return "req-" + secrets.token_hex(16)


# ------------------------------------------------------------------------------------------- settings (at start)
@dataclass(frozen=True)
class CaptureSettings:
    dir: str
    rate: float = 1.0
    redact: tuple[str, ...] = ()
    redact_hook: str | None = None
    max_shard_mb: float = DEFAULT_MAX_SHARD_MB


def capture_env(settings: CaptureSettings | None, source: str = CLI_SOURCE) -> dict[str, str]:
    """The server process's environment for `settings` (empty when capture is off), after checking every part
    of them here, at start: the folder (created 0700, writable, not full), the patterns and the hook. Messages
    name the settings as `source` spells them: `--capture` (pipeline serve's flags) or `serve.capture` (config)."""
    if settings is None or not settings.dir:
        return {}
    if not 0 <= settings.rate <= 1:
        raise StageError(f"{setting_name(source, 'rate')} must be between 0 and 1 (got {settings.rate}).")
    if not settings.max_shard_mb > 0:
        raise StageError(f"{setting_name(source, 'max_shard_mb')} must be above 0 (got {settings.max_shard_mb}).")
    compile_patterns(settings.redact, source)
    if settings.redact_hook:
        load_hook(settings.redact_hook, source)
    folder = prepare_folder(settings.dir, setting_name(source, "dir"))
    return {ENV_DIR: str(folder), ENV_RATE: repr(float(settings.rate)), ENV_REDACT: json.dumps(list(settings.redact)),
            ENV_REDACT_HOOK: settings.redact_hook or "", ENV_MAX_SHARD_MB: repr(float(settings.max_shard_mb))}


def compile_patterns(patterns, source: str = CLI_SOURCE) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise StageError(f"{setting_name(source, 'redact')} {pattern!r} is not a valid regular expression "
                             f"({exc}); fix the pattern (Python `re` syntax).") from None
    return compiled


def load_hook(spec: str, source: str = CLI_SOURCE):
    """`module:function`, a function str -> str applied to every text before it is written."""
    named = f"{setting_name(source, 'redact_hook')} {spec!r}"
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise StageError(f"{named} must be `module:function` (a function from str to str).")
    try:
        hook = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise StageError(f"{named} cannot be loaded ({exc.__class__.__name__}: {exc}); the module must be "
                         "importable by the server (PYTHONPATH).") from None
    if not callable(hook):
        raise StageError(f"{named} is not a function.")
    return hook


# ------------------------------------------------------------------------------------------- in the server
@dataclass
class CapturePlan:
    """One request the capture will record, decided before it reaches the engine."""

    request_id: str
    endpoint: str
    requested_model: str | None
    request: dict  # the request as sent on (its `capture` field removed)
    wants_ids: bool  # the caller asked for token ids itself: they stay in its answer
    streamed: bool = False  # an event stream: passed on as it comes, recorded from its chunks once it ends
    routed: dict | None = None
    started: float = field(default_factory=time.monotonic)


class Capture:
    """The server process's capture: decides which requests are recorded, writes records and feedback."""

    def __init__(self, folder: Path, rate: float = 1.0, patterns=(), hook=None,
                 max_shard_mb: float = DEFAULT_MAX_SHARD_MB):
        self.folder = folder
        self.rate = rate
        self.patterns = compile_patterns(patterns)
        self.hook = hook
        max_bytes = int(max_shard_mb * (1 << 20))
        self.records = ShardWriter(folder / "records", max_bytes)
        self.feedback = ShardWriter(folder / "feedback", max_bytes)
        self.written = 0
        self.lost = 0
        self.feedback_written = 0
        self._warned = False
        # request ids known to be captured: this process's own, and those of the record shards' lines read so
        # far (other replicas, earlier runs); each shard is read once, then only what was appended since
        self._known: set[str] = set()
        self._indexed: dict[str, int] = {}  # record shard name -> bytes of it already read into _known
        self._index_lock = threading.Lock()  # known() runs in executor threads
        self._hook_lock = threading.Lock()
        self._digests: dict[str, str | None] = {}  # adapter folder -> its manifest digest

    @classmethod
    def from_env(cls) -> "Capture | None":
        folder = os.environ.get(ENV_DIR)
        if not folder:
            return None
        hook_spec = os.environ.get(ENV_REDACT_HOOK)
        capture = cls(Path(folder), float(os.environ.get(ENV_RATE) or 1.0),
                      json.loads(os.environ.get(ENV_REDACT) or "[]"), load_hook(hook_spec) if hook_spec else None,
                      float(os.environ.get(ENV_MAX_SHARD_MB) or DEFAULT_MAX_SHARD_MB))
        from serve import version_metrics

        version_metrics.add_metrics_text(capture.render_metrics)
        log.info("capturing answered requests in %s (rate %s)", folder, capture.rate)
        return capture

    # ---------------------------------------------------------------- before the engine
    def plan(self, scope, body: bytes, requested_model: str | None, request_id: str) -> tuple[CapturePlan | None, bytes]:
        """(the plan, or None when this request is not recorded; the body to send on)."""
        endpoint = ENDPOINTS.get(scope["path"])
        if endpoint is None:
            return None, body
        try:
            data = json.loads(body)
        except ValueError:
            return None, body
        if not isinstance(data, dict):
            return None, body
        changed = OPT_OUT_FIELD in data  # the field is ours: it never reaches vLLM
        opted_out = data.pop(OPT_OUT_FIELD, None) is False or (header(scope, OPT_OUT_HEADER) or "").lower() == "off"
        if opted_out or (self.rate < 1 and random.random() >= self.rate):
            return None, json.dumps(data).encode() if changed else body
        wants_ids = bool(data.get("return_token_ids"))
        streamed = bool(data.get("stream"))
        if streamed:  # its chunks go to the caller untouched: the ids are recorded only when the caller asks too
            plan = CapturePlan(request_id, endpoint, requested_model or data.get("model"), data, wants_ids, True)
            return plan, json.dumps(data).encode() if changed else body
        data["return_token_ids"] = True
        return CapturePlan(request_id, endpoint, requested_model or data.get("model"), data, wants_ids), json.dumps(data).encode()

    # ---------------------------------------------------------------- after the answer
    async def answered(self, plan: CapturePlan, watch) -> bytes:
        """Record an answered request (status 200) and return the body to send to the caller."""
        body = watch.body
        try:
            answer = json.loads(body)
            choice = answer["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            return body  # not an answer this capture understands: passed on untouched, not recorded
        await self._write_record(plan, lambda: (answer, choice))
        if not plan.wants_ids:  # asked for by the capture, not the caller: its answer as vLLM gives it otherwise
            _clear_ids(answer)
            for each in answer.get("choices") or []:
                _clear_ids(each)
            body = json.dumps(answer).encode()
        return body

    async def answered_stream(self, plan: CapturePlan, watch) -> None:
        """Record a streamed answer (status 200) from its chunks, before its end (`[DONE]`) goes to the caller."""
        if watch.kept > STREAM_CAPTURE_BYTES:  # kept only its first bytes: a record of part of it would mislead
            self.lost += 1
            log.warning("capture: a streamed answer over %d MiB was not recorded (request %s)",
                        STREAM_CAPTURE_BYTES >> 20, plan.request_id)
            return

        def streamed_answer():  # up to 16 MiB of events to join and parse: in the executor, not on the event loop
            answer = _assembled(watch.body, plan.endpoint)  # the stream waits for this call: its parts stay as they are
            return None if answer is None else (answer, answer["choices"][0])

        await self._write_record(plan, streamed_answer)

    async def _write_record(self, plan: CapturePlan, answer_of) -> None:
        """Record `answer_of()`'s (answer, first choice), or nothing when it gives None (a stream this capture does
        not understand, or one cut off). Built off the event loop: assembling a stream and the redaction (the
        user's patterns and hook) may take their time while the server's other requests go on."""
        ok = await asyncio.get_running_loop().run_in_executor(None, self._record_written, plan, answer_of)
        if ok is None:
            return
        self._count(ok, self.records)
        if ok:
            self._known.add(plan.request_id)

    def _record_written(self, plan: CapturePlan, answer_of) -> bool | None:
        answered = answer_of()
        if answered is None:
            return None
        record = self._record(plan, *answered)
        return self.records.write((json.dumps(record, ensure_ascii=False) + "\n").encode())

    def _record(self, plan: CapturePlan, answer: dict, choice: dict) -> dict:
        redacted = False
        messages = prompt = None
        if plan.endpoint == "chat":
            messages, redacted = self._redact_json(plan.request.get("messages"))
            completion = (choice.get("message") or {}).get("content")
        else:
            prompt, redacted = self._redact_json(plan.request.get("prompt"))
            completion = choice.get("text")
        completion, changed = self._redact_json(completion)
        redacted = redacted or changed
        routed = plan.routed or {}
        usage = answer.get("usage") or {}
        prompt_ids = answer.get("prompt_token_ids", choice.get("prompt_token_ids"))
        return {
            "kind": "request", "format": RECORD_FORMAT, "request_id": plan.request_id, "time": utc_now(),
            "adapter": routed.get("adapter"), "version": routed.get("version"),
            "manifest_digest": self._digest(routed.get("path")), "requested_model": plan.requested_model,
            "route_target": _route_ref(routed), "endpoint": plan.endpoint, "messages": messages, "prompt": prompt,
            "completion": completion,
            # the served ids spell the text: where redaction changed any text they would keep it, so they go
            "prompt_token_ids": None if redacted else prompt_ids,
            "token_ids": None if redacted else choice.get("token_ids"),
            "finish_reason": choice.get("finish_reason"), "latency_s": round(time.monotonic() - plan.started, 6),
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "redacted": redacted,
        }

    def _redact_text(self, text: str) -> tuple[str, bool]:
        new = text
        for pattern in self.patterns:
            new = pattern.sub(REDACTED, new)
        if self.hook is not None:
            with self._hook_lock:  # records are built in executor threads: the user's hook is called one at a time
                new = self.hook(new)
        return new, new != text

    def _redact_json(self, value):
        """Every string inside `value` (a message list, a prompt or a list of prompts) redacted."""
        if isinstance(value, str):
            return self._redact_text(value)
        if isinstance(value, list):
            out, changed = [], False
            for item in value:
                new, c = self._redact_json(item)
                out.append(new)
                changed |= c
            return out, changed
        if isinstance(value, dict):
            out, changed = {}, False
            for key, item in value.items():
                new, c = self._redact_json(item)
                out[key] = new
                changed |= c
            return out, changed
        return value, False

    def _digest(self, folder: str | None) -> str | None:
        if not folder:
            return None
        if folder not in self._digests:
            try:
                self._digests[folder] = "sha256:" + hashlib.sha256((Path(folder) / "manifest.json").read_bytes()
                                                                   ).hexdigest()
            except OSError:
                return None
        return self._digests[folder]

    def _count(self, ok: bool, writer: ShardWriter) -> None:
        if ok:
            self.written += 1
            return
        self.lost += 1
        if not self._warned:  # once: a full disk would otherwise log on every request
            self._warned = True
            log.error("capture: could not write to %s (%s); records are lost from now on until it is writable "
                      "again (counted in /metrics as %srecords_lost_total)", writer.folder,
                      writer.last_error, METRIC_PREFIX)

    # ---------------------------------------------------------------- feedback
    def known(self, request_id: str) -> bool:
        """Whether `request_id` was captured, by this process or by another one writing to the same folder
        (the other replicas, an earlier run): a miss here is looked up in the record shards on disk."""
        if request_id in self._known:
            return True
        self._index_new_lines()
        return request_id in self._known

    def _index_new_lines(self) -> None:
        """Add the request ids of the record lines written since the last look (by any process) to `_known`.
        A miss thus costs a listing and what was appended since, not a read of the whole capture."""
        with self._index_lock:
            for shard in sorted((self.folder / "records").glob("*.jsonl")):
                done = self._indexed.get(shard.name, 0)
                try:
                    with open(shard, "rb") as f:
                        f.seek(done)
                        new = f.read()
                except OSError:
                    continue
                complete = new.rfind(b"\n") + 1  # a line still being written is read once it is whole
                for line in new[:complete].splitlines():
                    try:
                        request_id = json.loads(line).get("request_id")
                    except (ValueError, AttributeError):
                        continue  # a torn line (a writer killed mid-line) names no captured request
                    if isinstance(request_id, str):
                        self._known.add(request_id)
                self._indexed[shard.name] = done + complete

    def write_feedback(self, request_id: str, score, label, comment) -> bool:
        record = {"kind": "feedback", "format": RECORD_FORMAT, "request_id": request_id, "time": utc_now(),
                  "score": score, "label": label, "comment": comment}
        ok = self.feedback.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
        if ok:
            self.feedback_written += 1
        return ok

    def render_metrics(self) -> str:
        p = METRIC_PREFIX
        return (f"# HELP {p}records_written_total Request records the capture wrote.\n"
                f"# TYPE {p}records_written_total counter\n{p}records_written_total {self.written}\n"
                f"# HELP {p}records_lost_total Request records the capture could not write (the requests were "
                f"answered).\n# TYPE {p}records_lost_total counter\n{p}records_lost_total {self.lost}\n"
                f"# HELP {p}feedback_written_total Feedback records written.\n"
                f"# TYPE {p}feedback_written_total counter\n{p}feedback_written_total {self.feedback_written}\n")


def _assembled(stream: bytes, endpoint: str) -> dict | None:
    """The first choice of an event stream (`data: {...}` lines up to `data: [DONE]`) as one non-streamed answer:
    its text, token ids (when the chunks carry them), finish reason, prompt ids and usage (when sent)."""
    text, ids, finish, prompt_ids, usage, seen, done = [], [], None, None, None, False, False
    for line in stream.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            done = True
            continue
        try:
            chunk = json.loads(payload)
        except ValueError:
            return None
        usage = chunk.get("usage") or usage
        prompt_ids = prompt_ids or chunk.get("prompt_token_ids")
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            seen = True
            piece = (choice.get("delta") or {}).get("content") if endpoint == "chat" else choice.get("text")
            text.append(piece or "")
            ids.extend(choice.get("token_ids") or [])
            prompt_ids = prompt_ids or choice.get("prompt_token_ids")
            finish = choice.get("finish_reason") or finish
    if not (seen and done):
        return None
    joined = "".join(text)
    choice = {"message": {"content": joined}} if endpoint == "chat" else {"text": joined}
    choice.update(token_ids=ids or None, finish_reason=finish, prompt_token_ids=prompt_ids)
    return {"choices": [choice], "usage": usage}


def _clear_ids(part: dict) -> None:
    for key in ("token_ids", "prompt_token_ids"):
        if part.get(key) is not None:
            part[key] = None  # vLLM's answer has the keys, null, when the ids were not asked for


def _route_ref(routed: dict) -> str | None:
    if not routed.get("route_target"):
        return None
    return f"{routed['adapter']}@{routed['route_target']}"
