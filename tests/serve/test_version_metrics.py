"""Per-version metrics, `pipeline serve status` and automatic rollback against one real `pipeline serve
--auto-rollback` (tiny model, vLLM CPU), driven by the official `openai` client.

`metered` has three versions of a synthetic adapter: 1 (alias prod), 2 (alias canary), 3 (alias bad, whose weights
are tampered with after the server loaded it, so the server refuses it with 422 from then on). The server's
rollout settings judge a candidate after 5 answers in a 30 s window, with an error-rate limit of 0.2; its latency
limit is out of reach (1000x), since the tiny model's timings on a loaded 2-core machine prove nothing.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from pipeline.cli import cli_entry
from registry import open_registry
from serve.version_metrics import fetch_metrics_text, read_version_stats, stats_from_text
from tests.serve.shared_server import ALIAS_TTL_S, API_KEY
from tests.serve.shared_server import ROLLOUT_MIN_REQUESTS as MIN_REQUESTS, ROLLOUT_WINDOW_S as WINDOW_S
from tests.synthetic_lora import write_lora

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PROMPT = "What is 3 + 4?"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir, shared_server):
    root = tmp_path_factory.mktemp("version-metrics")
    reg = open_registry(str(shared_server.registry_dir), mirror_mlflow=False)
    for seed in (1, 2, 3):
        reg.publish(write_lora(root / f"lora-{seed}", rank=8, alpha=16, seed=seed), "metered", base_dir=tiny_model_dir)
    for alias, version in (("prod", 1), ("canary", 2), ("bad", 3)):
        reg.set_alias("metered", alias, version)
    server = shared_server.ensure_started()
    yield {"url": server.url, "registry": reg, "log": server.log, "client": server.client()}


def _complete(client, model: str, user: str | None = None):
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0,
                                     **({"user": user} if user else {}))


def _by_target(url: str) -> dict:
    return stats_from_text(fetch_metrics_text(url, API_KEY), by_route_target=True)


def _delta(after: dict, before: dict) -> dict:
    """{(adapter, version, route_target): (requests, errors, prompt tokens, completion tokens)} that grew."""
    out = {}
    for key, s in after.items():
        b = before.get(key)
        got = (s.requests - (b.requests if b else 0), s.errors - (b.errors if b else 0),
               s.prompt_tokens - (b.prompt_tokens if b else 0), s.completion_tokens - (b.completion_tokens if b else 0))
        if any(got):
            out[key] = got
    return out


def test_per_version_counters_equal_what_was_sent(served):
    """60 routed requests (prod=70 canary=30, distinct users), 5 for `metered@3` and 3 streamed ones for `metered@prod`
    with usage: every counter grows by exactly what the client saw answered, tokens by the answers' usage, and a
    mirror's copies are counted under `mirror:<target>`."""
    client, reg, url = served["client"], served["registry"], served["url"]
    before = _by_target(url)
    route = reg.set_route("metered", {"prod": 70, "canary": 30})
    try:
        time.sleep(ALIAS_TTL_S + 0.5)  # the route reaches the server's lookups within its TTL
        users = [f"counted-{i}" for i in range(60)]
        with ThreadPoolExecutor(4) as pool:
            routed = list(pool.map(lambda u: _complete(client, "metered", u), users))
        exact = [_complete(client, "metered@3") for _ in range(5)]
        streamed = []
        for _ in range(3):
            chunks = list(client.completions.create(model="metered@prod", prompt=PROMPT, max_tokens=4, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}))
            streamed.append(next(c.usage for c in chunks if c.usage is not None))
    finally:
        reg.clear_route("metered")
    want, tokens = Counter(), Counter()
    for user, answer in zip(users, routed):
        target = route.pick(user)
        assert answer.model == {"prod": "metered@1", "canary": "metered@2"}[target]
        key = ("metered", 1 if target == "prod" else 2, target)
        want[key] += 1
        tokens[key + ("prompt",)] += answer.usage.prompt_tokens
        tokens[key + ("completion",)] += answer.usage.completion_tokens
    for key, answers in ((("metered", 3, ""), [a.usage for a in exact]), (("metered", 1, ""), streamed)):
        want[key] += len(answers)
        tokens[key + ("prompt",)] += sum(u.prompt_tokens for u in answers)
        tokens[key + ("completion",)] += sum(u.completion_tokens for u in answers)
    grown = _delta(_by_target(url), before)
    assert {key: got[0] for key, got in grown.items()} == dict(want)
    assert all(got[1] == 0 for got in grown.values())
    for key, got in grown.items():
        assert got[2:] == (tokens[key + ("prompt",)], tokens[key + ("completion",)]), key
    stats = read_version_stats(url, API_KEY)[("metered", 1)]
    # per answer TTFT <= e2e (equal when not streamed), so the estimates from the same buckets keep that order
    assert stats.ttft_p50 is not None and stats.ttft_p90 <= stats.e2e_p90

    # a mirror: every routed request is also sent to the canary; its copies count as mirror:canary, apart
    before = _by_target(url)
    reg.set_route("metered", {"prod": 100}, mirror="canary")
    try:
        time.sleep(ALIAS_TTL_S + 0.5)
        for i in range(6):
            assert _complete(client, "metered", f"mirrored-{i}").model == "metered@1"
        deadline = time.monotonic() + 60
        while _delta(_by_target(url), before).get(("metered", 2, "mirror:canary"), (0,))[0] < 6:
            assert time.monotonic() < deadline, _delta(_by_target(url), before)
            time.sleep(0.5)
    finally:
        reg.clear_route("metered")
    grown = _delta(_by_target(url), before)
    assert grown[("metered", 2, "mirror:canary")][:2] == (6, 0) and grown[("metered", 1, "prod")][:2] == (6, 0)


def test_serve_status_prints_a_table_per_version(served, capsys):
    client = served["client"]
    _complete(client, "metered@canary")
    assert cli_entry(["serve", "status", "--url", served["url"], "--api-key", API_KEY]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["ADAPTER", "VERSION", "ROUTE", "TARGET"]
    rows = {tuple(line.split()[:3]): line.split() for line in lines[1:]}
    row = rows[("metered", "2", "-")]
    assert int(row[3]) >= 1 and row[5] == "0.0%" and float(row[7]) > 0  # requests, error rate, TTFT p90

    assert cli_entry(["serve", "status", "--url", served["url"], "--api-key", "wrong"]) == 2
    assert "HTTP 401" in capsys.readouterr().err


def test_a_failing_canary_is_taken_out_of_its_route_within_the_window(served):
    """`bad` (metered@3, tampered after it loaded: 422) gets half the traffic of `metered`. The server rolls it back
    within the window: prod=100 bad=0 in the registry, one `auto_rollback` event with its figures, one warning
    line in the server log; the clients saw failures only until the route change reached the server, every one
    of them counted against metered@3, and everything after it succeeds on prod."""
    client, reg, url = served["client"], served["registry"], served["url"]
    assert _complete(client, "metered@3").model == "metered@3"  # loaded and verified before the tampering
    weights = reg.resolve("metered@3").path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(openai.UnprocessableEntityError):
        _complete(client, "metered@3")
    before = _by_target(url)
    reg.set_route("metered", {"prod": 50, "bad": 50})
    started = time.time()
    outcomes, stop = [], threading.Event()

    def worker(k: int):
        n = 0
        while not stop.is_set():
            sent = time.time()
            try:
                model = _complete(client, "metered", f"roll-{k}-{n}").model
                outcomes.append((sent, model, None))
            except openai.APIStatusError as exc:
                outcomes.append((sent, None, exc.status_code))
            n += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    try:
        while reg.get_route("metered").weights.get("bad"):
            assert time.time() - started < WINDOW_S, (
                f"not rolled back within {WINDOW_S} s: {Counter(status or model for _, model, status in outcomes)}")
            time.sleep(0.2)
        rolled_back = time.time()
        while sum(sent > rolled_back + ALIAS_TTL_S + 1 for sent, *_ in outcomes) < 20:
            assert time.time() - rolled_back < 60
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        route_now = reg.get_route("metered")
        reg.clear_route("metered")
    assert route_now.weights == {"prod": 100, "bad": 0}
    failures = [(sent, status) for sent, _, status in outcomes if status is not None]
    assert {status for _, status in failures} == {422}
    assert len(failures) >= MIN_REQUESTS
    # only requests sent before the route change reached the server failed; afterwards all of them went to prod
    assert all(sent < rolled_back + ALIAS_TTL_S + 1 for sent, _ in failures), (rolled_back, failures)
    assert all(model == "metered@1" for sent, model, _ in outcomes if sent > rolled_back + ALIAS_TTL_S + 1)
    grown = _delta(_by_target(url), before)
    assert grown[("metered", 3, "bad")][:2] == (len(failures), len(failures))  # every failure counted against v3

    events = [e for e in reg.history("metered") if e.kind == "auto_rollback"]
    assert len(events) == 1
    event = events[0]
    assert event.figures["candidate"] == "bad" and event.figures["versions"] == [3]
    assert event.figures["requests"] >= MIN_REQUESTS and event.figures["error_rate"] == 1.0
    assert event.after["targets"] == {"prod": 100, "bad": 0} and "failed" in event.reason
    with open(served["log"], errors="replace") as log:
        warnings = [line for line in log if "auto-rollback: bad failed" in line]
    assert len(warnings) == 1, warnings
