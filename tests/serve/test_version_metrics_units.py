"""Per-version metrics without a server: what one answer adds, the Prometheus text and reading it back, quantiles
from buckets, `usage` from JSON and SSE bodies, and the ASGI recording (against a real server:
tests/serve/test_version_metrics.py)."""

from __future__ import annotations

import asyncio
import json

import pytest

from serve.version_metrics import (BUCKETS_S, Outcome, VersionMetrics, _Answer, bucket_quantile, metrics_url,
                                   recorded, stats_from_text, with_version_metrics)
import serve.version_metrics as version_metrics


def test_rendered_text_reads_back_per_version_and_per_route_target():
    metrics = VersionMetrics()
    for _ in range(7):
        metrics.record(Outcome("alpha", 1, "prod", 200, 0.02, 0.3, 5, 8))
    for _ in range(2):
        metrics.record(Outcome("alpha", 2, "canary", 422, None, 0.001))
    metrics.record(Outcome("alpha", 2, "", 200, 0.04, 0.04, 5, 3))
    metrics.record(Outcome("alpha", 2, "mirror:canary", 503, None, 0.5))
    metrics.record(Outcome('we"ird', None, "", 404, None, 0.01))
    text = metrics.render()
    assert 'lora_pipeline_adapter_requests_total{adapter="alpha",version="1",route_target="prod",' \
           'status_class="2xx"} 7' in text
    assert "# TYPE lora_pipeline_adapter_ttft_seconds histogram" in text
    per_version = stats_from_text(text)
    one, two = per_version[("alpha", 1)], per_version[("alpha", 2)]
    assert (one.requests, one.errors, one.prompt_tokens, one.completion_tokens) == (7, 0, 35, 56)
    assert (two.requests, two.errors, two.error_rate) == (4, 3, 0.75)
    assert two.route_targets == ("", "canary", "mirror:canary")
    assert 0.25 < one.e2e_p50 <= 0.5 and 0.01 < one.ttft_p90 <= 0.025  # inside the buckets holding them
    # only the 2xx answer of version 2 is in its latency histograms
    assert 0.025 < two.e2e_p90 <= 0.05
    assert per_version[('we"ird', None)].errors == 1
    by_target = stats_from_text(text, by_route_target=True)
    assert by_target[("alpha", 2, "canary")].requests == 2 and by_target[("alpha", 2, "")].requests == 1


def test_bucket_quantile_interpolates_like_prometheus():
    assert bucket_quantile(0.5, {}) is None and bucket_quantile(0.5, {1.0: 0, float("inf"): 0}) is None
    assert bucket_quantile(0.5, {1.0: 0, 2.0: 10, float("inf"): 10}) == 1.5
    assert bucket_quantile(0.9, {1.0: 10, float("inf"): 20}) == 1.0  # in +Inf: the highest finite bound
    assert len(BUCKETS_S) == len(set(BUCKETS_S)) and list(BUCKETS_S) == sorted(BUCKETS_S)


@pytest.mark.parametrize("body, expected", [
    (json.dumps({"choices": [{"text": 'say "usage": {"prompt_tokens": 99}'}],
                 "usage": {"prompt_tokens": 12, "total_tokens": 20, "completion_tokens": 8,
                           "prompt_tokens_details": None}}).encode(), (12, 8)),
    (b'data: {"choices":[{"text":"a"}],"usage":null}\n\ndata: {"choices":[],"usage":{"prompt_tokens":3,'
     b'"completion_tokens":4,"total_tokens":7}}\n\ndata: [DONE]\n\n', (3, 4)),
    (b'data: {"choices":[{"text":"a"}]}\n\ndata: [DONE]\n\n', (None, None)),  # a stream without include_usage
    (json.dumps({"choices": [{"text": 'not "usage": {"prompt_tokens": 1}'}]}).encode(), (None, None)),
])
def test_usage_is_read_from_the_answer(body, expected):
    answer = _Answer(None)
    answer.tail = body
    assert answer.usage() == expected


def _run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_recorded_counts_pinned_requests_only_and_a_raising_app_as_500(monkeypatch):
    seen = []
    monkeypatch.setattr(version_metrics, "observe", lambda **fields: seen.append(fields))

    async def send(message):
        pass

    async def answering(scope, receive, send):
        scope["pinned"] = {"adapter": "alpha", "version": 3, "route_target": "canary", "mirror": None}
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        await asyncio.sleep(0.05)
        await send({"type": "http.response.body", "body": b'data: {"usage":{"prompt_tokens":2,"completion_tokens":'
                                                          b'5}}\n\n', "more_body": False})

    async def raising(scope, receive, send):
        scope["pinned"] = {"adapter": "alpha", "version": 1, "route_target": "", "mirror": None}
        raise RuntimeError("engine died")

    async def unpinned(scope, receive, send):
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    _run(recorded(answering, {}, None, send, "pinned"))
    with pytest.raises(RuntimeError):
        _run(recorded(raising, {}, None, send, "pinned"))
    _run(recorded(unpinned, {}, None, send, "pinned"))
    assert len(seen) == 2
    streamed, failed = seen
    assert streamed["status"] == 200 and streamed["route_target"] == "canary" and streamed["version"] == 3
    assert streamed["ttft_s"] < 0.05 <= streamed["e2e_s"]  # the first chunk, then the rest 50 ms later
    assert (streamed["prompt_tokens"], streamed["completion_tokens"]) == (2, 5)
    assert failed["status"] == 500 and failed["version"] == 1 and failed["ttft_s"] == failed["e2e_s"]


def test_metrics_are_appended_to_the_apps_own_uncompressed(monkeypatch):
    monkeypatch.setattr(version_metrics, "METRICS", VersionMetrics())
    version_metrics.METRICS.record(Outcome("alpha", 1, "", 200, 0.1, 0.1, 1, 1))
    headers_seen, sent = [], []

    async def app(scope, receive, send):
        headers_seen.extend(scope["headers"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"8")]})
        await send({"type": "http.response.body", "body": b"vllm 1.0", "more_body": False})

    async def send(message):
        sent.append(message)

    _run(with_version_metrics(app, {"type": "http", "headers": [(b"accept-encoding", b"gzip")]}, None, send))
    assert headers_seen == []
    body = sent[1]["body"]
    assert body.startswith(b"vllm 1.0\n") and b'lora_pipeline_adapter_requests_total{adapter="alpha"' in body
    assert dict(sent[0]["headers"])[b"content-length"] == str(len(body)).encode()


def test_metrics_url_from_the_openai_base_url():
    assert metrics_url("http://h:8000/v1") == metrics_url("http://h:8000/v1/") == "http://h:8000/metrics"
    assert metrics_url("http://h:8000") == "http://h:8000/metrics"
