"""serve/capture.py and serve/feedback.py without a server: the folder checks at start, shard rotation, ids
captured by another process, redaction of token ids, the settings' way from config to the server's environment."""

from __future__ import annotations

import asyncio
import json
import os
import stat

import pytest

from ground.errors import StageError
from serve import feedback
from serve.capture import ENV_DIR, ENV_REDACT, Capture, CapturePlan, CaptureSettings, capture_env, prepare_folder
from serve.capture_files import ShardWriter


def test_the_folder_is_created_0700_with_its_marker(tmp_path):
    folder = prepare_folder(tmp_path / "a" / "capture")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert {p.name for p in folder.iterdir()} == {"capture.json", "records", "feedback"}
    marker = (folder / "capture.json").read_bytes()
    prepare_folder(folder)  # written once: a second start leaves it as it is
    assert (folder / "capture.json").read_bytes() == marker


def test_an_unusable_folder_pattern_or_hook_is_refused_by_name(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StageError, match=str(blocker / "cap")):
        capture_env(CaptureSettings(str(blocker / "cap")))
    with pytest.raises(StageError, match=r"\(unclosed"):
        capture_env(CaptureSettings(str(tmp_path / "c"), redact=("(unclosed",)))
    with pytest.raises(StageError, match="no_such_module:f"):
        capture_env(CaptureSettings(str(tmp_path / "c"), redact_hook="no_such_module:f"))
    env = capture_env(CaptureSettings(str(tmp_path / "c"), redact=("a+",)))
    assert env[ENV_DIR] == str(tmp_path / "c") and json.loads(env[ENV_REDACT]) == ["a+"]
    assert capture_env(None) == {}


def test_shards_rotate_by_size_and_are_only_appended(tmp_path):
    writer = ShardWriter(tmp_path, max_bytes=100)
    for i in range(5):
        assert writer.write(json.dumps({"i": i, "pad": "x" * 40}).encode() + b"\n")
    shards = sorted(tmp_path.glob("*.jsonl"))
    assert len(shards) == 5 and shards[0].name.endswith("-00001.jsonl")
    assert [json.loads(s.read_text())["i"] for s in shards] == list(range(5))
    assert str(os.getpid()) in shards[0].name


def test_an_id_captured_by_another_process_is_known(tmp_path):
    other = Capture(prepare_folder(tmp_path / "cap"))
    record = {"kind": "request", "request_id": "req-" + "ab" * 16}
    other.records.write((json.dumps(record) + "\n").encode())
    this = Capture(tmp_path / "cap")  # another replica: nothing in its memory
    assert this.known("req-" + "ab" * 16) and not this.known("req-" + "cd" * 16)


def _bytes_read() -> int:
    """Bytes this process has read through read() calls so far (/proc/self/io `rchar`)."""
    for line in open("/proc/self/io"):
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("/proc/self/io has no rchar line")


def test_unknown_ids_do_not_reread_the_capture(tmp_path):
    """`POST /v1/feedback` with an id the capture never saw must not cost a read of every shard each time: the
    shards' lines are indexed once, and later looks read only what was appended since (another writer's lines
    included, a line still being written once it is complete)."""
    other = Capture(prepare_folder(tmp_path / "cap"), max_shard_mb=1)
    pad = "x" * 2000
    for i in range(1500):  # ~3 MB in 3-4 shards, written by "another process"
        line = json.dumps({"kind": "request", "request_id": f"req-{i:032x}", "pad": pad}) + "\n"
        other.records.write(line.encode())
    this = Capture(tmp_path / "cap")
    assert not this.known("req-" + "f" * 32)  # the first look reads the shards
    before = _bytes_read()
    for _ in range(20):
        assert not this.known("req-" + "f" * 32)
    assert _bytes_read() - before < 1 << 20  # reading the shards again would be 20 x 3 MB
    assert this.known(f"req-{7:032x}") and this.known(f"req-{1499:032x}")
    other.records.write(b'{"kind": "request", "request_id": "req-late", "pad": "')  # still being written
    assert not this.known("req-late")
    other.records.write(b'"}\n')
    assert this.known("req-late")


def test_redacted_text_takes_the_token_ids_with_it(tmp_path):
    capture = Capture(prepare_folder(tmp_path / "cap"), patterns=[r"\d{4}"])
    plan = CapturePlan("req-1", "completion", "alpha", {"prompt": "pin 1234"}, wants_ids=False)
    answer = {"choices": [{"text": "ok", "token_ids": [1, 2], "prompt_token_ids": [3], "finish_reason": "stop"}]}
    record = capture._record(plan, answer, answer["choices"][0])
    assert record["prompt"] == "pin [REDACTED]" and record["redacted"] is True
    assert record["token_ids"] is None and record["prompt_token_ids"] is None


def test_feedback_bodies_are_refused_naming_the_field():
    for body, field in ((b"[]", "request_id"), (b'{"request_id": "x y", "score": 1}', "request_id"),
                        (b'{"request_id": "req-1"}', "score"), (b'{"request_id": "req-1", "score": true}', "score"),
                        (b'{"request_id": "req-1", "label": "ok"}', "label"),
                        (b'{"request_id": "req-1", "score": 1, "comment": 5}', "comment")):
        with pytest.raises(feedback.FeedbackRefused, match=f"`{field}`") as refused:
            feedback.parse_feedback(body)
        assert refused.value.status == 400
    assert feedback.parse_feedback(b'{"request_id": "req-1", "label": "good"}') == ("req-1", None, "good", None)


def test_feedback_without_capture_is_404():
    async def go():
        with pytest.raises(feedback.FeedbackRefused) as refused:
            await feedback.handle(None, {"method": "POST"}, None)
        return refused.value.status

    assert asyncio.run(go()) == 404


def test_serve_capture_keys_reach_the_server_environment(tmp_path):
    from config.loader import load_config
    from stages.serve_stage import capture_environment

    cfg = load_config(None, [f"serve.capture.dir={tmp_path / 'cap'}", "serve.capture.rate=0.5",
                             "serve.capture.redact=[x+]", "serve.capture.max_shard_mb=2"])
    env = capture_environment(cfg)
    assert env[ENV_DIR] == str(tmp_path / "cap") and float(env["PIPELINE_SERVE_CAPTURE_RATE"]) == 0.5
    assert json.loads(env[ENV_REDACT]) == ["x+"] and float(env["PIPELINE_SERVE_CAPTURE_MAX_SHARD_MB"]) == 2.0
    assert capture_environment(load_config(None, [])) == {}


def test_a_redact_pattern_that_does_not_compile_is_refused_when_the_config_loads():
    """Not when the serve stage starts, after a whole training run and its publish."""
    from config.loader import load_config
    from ground.errors import ConfigError

    with pytest.raises(ConfigError, match=r"serve\.capture\.redact.*\(unclosed.*not a valid regular expression"):
        load_config(None, ["serve.capture.redact=['(unclosed']"])
    assert load_config(None, ["serve.capture.redact=['SECRET-[0-9]+']"]).serve.capture.redact == ["SECRET-[0-9]+"]


def test_a_stream_is_assembled_from_its_chunks():
    from serve.capture import _assembled

    def events(*chunks, done=True):
        lines = [b"data: " + json.dumps(c).encode() for c in chunks] + ([b"data: [DONE]"] if done else [])
        return b"\n\n".join(lines) + b"\n\n"

    chat = events({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "token_ids": None}],
                   "prompt_token_ids": [1, 2]},
                  {"choices": [{"index": 0, "delta": {"content": "4"}, "token_ids": [19]}]},
                  {"choices": [{"index": 1, "delta": {"content": "other"}}]},  # a second choice: not recorded
                  {"choices": [{"index": 0, "delta": {"content": "2"}, "token_ids": [17], "finish_reason": "stop"}]},
                  {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2}})
    answer = _assembled(chat, "chat")
    assert answer == {"choices": [{"message": {"content": "42"}, "token_ids": [19, 17], "finish_reason": "stop",
                                   "prompt_token_ids": [1, 2]}],
                      "usage": {"prompt_tokens": 2, "completion_tokens": 2}}
    completion = events({"choices": [{"index": 0, "text": "ab"}]}, {"choices": [{"index": 0, "text": "c",
                                                                                "finish_reason": "length"}]})
    assert _assembled(completion, "completion")["choices"][0] == {
        "text": "abc", "token_ids": None, "finish_reason": "length", "prompt_token_ids": None}
    assert _assembled(events({"choices": [{"index": 0, "text": "ab"}]}, done=False), "completion") is None  # cut off
    assert _assembled(b"data: {broken\n\n", "completion") is None


def test_a_stream_whose_text_says_done_is_recorded_at_its_real_end(tmp_path):
    """The record is written when the stream's own `data: [DONE]` event goes out, not at a chunk whose text merely
    contains those characters (an answer about event streams): that chunk would be recorded as a cut-off stream."""
    from types import SimpleNamespace

    from serve.middleware import RegistryRefMiddleware

    capture = Capture(prepare_folder(tmp_path / "cap"))
    plan = CapturePlan("req-" + "ef" * 16, "chat", "alpha", {"messages": [{"role": "user", "content": "SSE?"}]},
                       wants_ids=False, streamed=True)
    sent = []

    async def send(message):
        sent.append(message)

    def event(payload) -> bytes:
        return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"

    messages = [
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]},
        {"type": "http.response.body", "more_body": True,
         "body": event({"choices": [{"index": 0, "delta": {"content": "it ends with data: [DONE] and"}}]})},
        {"type": "http.response.body", "more_body": True,
         "body": event({"choices": [{"index": 0, "delta": {"content": " a blank line"}, "finish_reason": "stop"}]})},
        {"type": "http.response.body", "more_body": True, "body": event(b"[DONE]")},
        {"type": "http.response.body", "more_body": False, "body": b""},
    ]

    async def stream():
        recording = RegistryRefMiddleware._recording_stream(SimpleNamespace(capture=capture), send, plan, [])
        for message in messages:
            await recording(message)

    asyncio.run(stream())
    assert [m.get("body") for m in sent[1:]] == [m["body"] for m in messages[1:]]  # passed on untouched
    [line] = b"".join(p.read_bytes() for p in sorted((tmp_path / "cap" / "records").glob("*.jsonl"))).splitlines()
    record = json.loads(line)
    assert record["request_id"] == plan.request_id
    assert record["completion"] == "it ends with data: [DONE] and a blank line" and record["finish_reason"] == "stop"


def _slow_hook(text: str) -> str:  # a redaction hook that calls out (a PII service, a model): slow per text
    import time

    time.sleep(0.2)
    return text


def test_the_redaction_hook_runs_off_the_event_loop(tmp_path):
    """The hook is the user's code and may take its time: while it runs, the server's other requests go on."""
    from types import SimpleNamespace

    capture = Capture(prepare_folder(tmp_path / "cap"), hook=_slow_hook)
    plan = CapturePlan("req-" + "12" * 16, "completion", "alpha", {"prompt": "hi"}, wants_ids=False)
    body = json.dumps({"choices": [{"text": "ok", "token_ids": [1], "finish_reason": "stop"}]}).encode()

    async def go():
        ticks = 0

        async def other_requests():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(other_requests())
        await asyncio.sleep(0)
        await capture.answered(plan, SimpleNamespace(body=body))  # prompt and completion: two hook calls, 0.4 s
        ticker.cancel()
        return ticks

    assert asyncio.run(go()) >= 5  # with the hook on the loop it ticked twice: before it and during the write
    [line] = b"".join(p.read_bytes() for p in (tmp_path / "cap" / "records").glob("*.jsonl")).splitlines()
    assert json.loads(line)["completion"] == "ok"


def test_a_stream_is_assembled_off_the_event_loop(tmp_path, monkeypatch):
    """Each stream keeps up to 16 MiB of events for its record: joining and parsing them happens in the executor
    thread that writes the record, not on the event loop every request shares. A cut-off stream writes nothing."""
    import threading
    from types import SimpleNamespace

    from serve import capture as capture_module

    threads, assembled = [], capture_module._assembled

    def watched(stream: bytes, endpoint: str):
        threads.append(threading.current_thread())
        return assembled(stream, endpoint)

    monkeypatch.setattr(capture_module, "_assembled", watched)
    capture = Capture(prepare_folder(tmp_path / "cap"))
    plan = CapturePlan("req-" + "34" * 16, "completion", "alpha", {"prompt": "hi"}, wants_ids=False, streamed=True)
    whole = b'data: {"choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'
    cut_off = whole.split(b"data: [DONE]")[0]

    async def go():
        for events in (whole, cut_off):
            await capture.answered_stream(plan, SimpleNamespace(kept=len(events), body=events))
        return threading.current_thread()

    loop_thread = asyncio.run(go())
    assert len(threads) == 2 and loop_thread not in threads
    assert (capture.written, capture.lost) == (1, 0)
    [line] = b"".join(p.read_bytes() for p in (tmp_path / "cap" / "records").glob("*.jsonl")).splitlines()
    assert json.loads(line)["completion"] == "ok"


def test_capture_errors_name_the_flag_or_the_config_key_the_value_came_from(tmp_path):
    from config.loader import load_config
    from stages.serve_stage import capture_environment

    with pytest.raises(StageError, match="--capture-rate must be between 0 and 1"):
        capture_env(CaptureSettings(str(tmp_path / "c"), rate=2.0))
    with pytest.raises(StageError, match="serve.capture.rate must be between 0 and 1"):
        capture_env(CaptureSettings(str(tmp_path / "c"), rate=2.0), source="serve.capture")
    # a module that is there but lacks the function: found when the config loads, refused when the stage starts
    cfg = load_config(None, [f"serve.capture.dir={tmp_path / 'c'}", "serve.capture.redact_hook=json:no_such_hook"])
    with pytest.raises(StageError, match=r"^serve\.capture\.redact_hook 'json:no_such_hook' cannot be loaded"):
        capture_environment(cfg)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StageError, match=r"set serve\.capture\.dir to a folder"):
        capture_env(CaptureSettings(str(blocker / "cap")), source="serve.capture")


def test_a_capture_hook_or_folder_that_cannot_work_is_refused_when_the_config_loads(tmp_path):
    """Not when the serve stage starts after the whole training run; and nothing is imported or created then."""
    from config.loader import load_config
    from ground.errors import ConfigError

    with pytest.raises(ConfigError, match=r"serve\.capture\.redact_hook.*no_such_module_r2.*not importable"):
        load_config(None, ["serve.capture.redact_hook=no_such_module_r2.scrub:hook"])
    with pytest.raises(ConfigError, match=r"serve\.capture\.redact_hook.*'scrub' must be `module:function`"):
        load_config(None, ["serve.capture.redact_hook=scrub"])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=rf"serve\.capture\.dir.*{blocker}/cap cannot be created: {blocker} is not a"):
        load_config(None, [f"serve.capture.dir={blocker / 'cap'}"])
    with pytest.raises(ConfigError, match=rf"serve\.capture\.dir.*{blocker} exists and is not a folder"):
        load_config(None, [f"serve.capture.dir={blocker}"])
    cfg = load_config(None, [f"serve.capture.dir={tmp_path / 'new' / 'cap'}", "serve.capture.redact_hook=json:dumps"])
    assert cfg.serve.capture.redact_hook == "json:dumps" and not (tmp_path / "new").exists()  # checked, not created


def test_a_failed_write_is_counted_and_logged_once_with_its_reason(tmp_path, caplog):
    import shutil

    capture = Capture(prepare_folder(tmp_path / "cap"))
    assert capture.records.last_error is None  # set from the start, not only after a failure
    shutil.rmtree(tmp_path / "cap" / "records")  # the first shard cannot be opened now
    for _ in range(2):
        capture._count(capture.records.write(b'{"kind": "request"}\n'), capture.records)
    assert (capture.written, capture.lost) == (0, 2) and isinstance(capture.records.last_error, FileNotFoundError)
    [logged] = [r.getMessage() for r in caplog.records if "could not write" in r.getMessage()]
    assert "No such file or directory" in logged


def test_the_opt_out_header_is_read_whatever_its_case():
    capture = Capture.__new__(Capture)  # plan() reads only the rate
    capture.rate = 1.0
    body = json.dumps({"model": "alpha", "prompt": "hi"}).encode()
    scope = {"path": "/v1/completions", "headers": [(b"x-capture", b" OFF ")]}
    assert capture.plan(scope, body, None, "req-1") == (None, body)
    plan, sent = capture.plan({**scope, "headers": [(b"x-capture", b"on")]}, body, None, "req-2")
    assert plan.request_id == "req-2" and json.loads(sent)["return_token_ids"] is True
