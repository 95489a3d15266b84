"""What the route tests of both serving modes share: a request that says which version answered, the binomial
interval a split's share must fall in, the route change under load and the mirror (tests/serve/test_routes*.py).

The registry these run against has `alpha` 1 (alias prod), 2 (alias canary) and 3 (latest, no alias), three
adapters with different greedy answers, so an answer tells its version apart (tests/serve/shared_server.py
publishes them).
"""

from __future__ import annotations

import math
import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from tests.serve.adapters import PROMPT

MAX_TOKENS = 8
TARGET_VERSIONS = {"prod": "alpha@1", "canary": "alpha@2"}
FOLLOW_S = 2.0  # a route change must be followed by every request sent this long after it
LATE_REQUESTS = 24  # requests each phase of the change under load waits for, sent after FOLLOW_S


def expected_version(target: str) -> str:
    return TARGET_VERSIONS.get(target, f"alpha@{target}")


def complete(client, model: str, user: str | None = None, session: str | None = None) -> tuple[str, list[int]]:
    """(the response's `model`, its token ids up to the first EOS) for a greedy completion of PROMPT."""
    extra = {"user": user} if user is not None else {}
    response = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, **extra,
        extra_headers={"x-session-id": session} if session is not None else None,
        extra_body={"return_token_ids": True})
    choice = response.choices[0]
    ids = list(choice.model_extra["token_ids"])
    return response.model, ids


def same_answer(ids: list[int], expected: list[int]) -> bool:
    """vLLM stops at EOS; transformers' generate pads after it: equal up to where the server stopped."""
    return len(ids) >= 1 and list(expected[: len(ids)]) == list(ids)


def metrics_text(url: str, api_key: str) -> str:
    request = urllib.request.Request(url.removesuffix("/v1") + "/metrics", headers={"Authorization": f"Bearer {api_key}"})
    return urllib.request.urlopen(request, timeout=30).read().decode()


def metric_total(url: str, api_key: str, metric: str) -> int:
    """The sum of every labelled sample of counter `metric` on /metrics."""
    pattern = r"^%s\{[^}]*\} ([0-9.e+]+)$" % re.escape(metric)
    return int(sum(float(n) for n in re.findall(pattern, metrics_text(url, api_key), re.M)))


def version_requests(text: str, version: int, route_target: str) -> int:
    """`lora_pipeline_adapter_requests_total` of alpha@`version` under `route_target`, all status classes."""
    pattern = (r'^lora_pipeline_adapter_requests_total\{adapter="alpha",version="%d",route_target="%s",'
               r'status_class="[^"]*"\} ([0-9.e+]+)$' % (version, re.escape(route_target)))
    return int(sum(float(n) for n in re.findall(pattern, text, re.M)))


def binomial_interval(n: int, p: float, confidence: float) -> tuple[int, int]:
    """The central `confidence` interval [low, high] of Binomial(n, p), exactly (log-space probabilities)."""
    def pmf(k: int) -> float:
        return math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                        + k * math.log(p) + (n - k) * math.log1p(-p))

    tail = (1 - confidence) / 2
    cdf, low, high = 0.0, None, n
    for k in range(n + 1):
        cdf += pmf(k)
        if low is None and cdf >= tail:
            low = k
        if cdf >= 1 - tail:
            high = k
            break
    return low, high


def route_change_under_load(client, registry, expected: dict, workers: int = 8) -> dict:
    """8 clients loop on `alpha` (a new `user` per request) while the route goes prod=90 canary=10 ->
    prod=50 canary=50 -> cleared. Asserts: no request failed, every answer is its `model`'s own, and each request
    sent FOLLOW_S after a change (or more) went where the route then in force sends its user (the latest version,
    alpha@3, once cleared). Returns the phases' counts for the caller's figures."""
    first = registry.set_route("alpha", {"prod": 90, "canary": 10})
    first_set = time.monotonic()
    results, errors, stop = [], [], threading.Event()

    def worker(k: int):
        n = 0
        while not stop.is_set():
            user, sent = f"load-{k}-{n}", time.monotonic()
            n += 1
            try:
                model, ids = complete(client, "alpha", user=user)
                results.append((sent, user, model, ids, time.monotonic()))
            except Exception as exc:  # every failure fails the test, reported below
                errors.append(f"{user}: {exc!r}")

    def wait_for_late(since: float):
        deadline = time.monotonic() + 60
        while sum(sent > since + FOLLOW_S for sent, *_ in results) < LATE_REQUESTS:
            assert time.monotonic() < deadline, f"too few requests after {since}: is the server stuck?"
            time.sleep(0.2)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(workers)]
    for thread in threads:
        thread.start()
    try:
        wait_for_late(first_set)
        change_began = time.monotonic()
        second = registry.set_route("alpha", {"prod": 50, "canary": 50})
        changed = time.monotonic()
        wait_for_late(changed)
        clear_began = time.monotonic()
        registry.clear_route("alpha")
        cleared = time.monotonic()
        wait_for_late(cleared)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert not errors, f"{len(errors)} failed requests: {errors[:3]}"
    for _, user, model, ids, _ in results:
        assert same_answer(ids, expected[model]), f"{user}: {model} answered {ids}, not its own version's answer"
    # (phase's requests, its route, when the next change began, the next route): a request sent in a phase but
    # still unanswered when the next change began may have been routed by either (the server picks the route
    # when the request reaches it, which under load can be after the next change)
    phases = {
        "90/10": ([r for r in results if first_set + FOLLOW_S < r[0] < change_began], first, change_began, second),
        "50/50": ([r for r in results if changed + FOLLOW_S < r[0] < clear_began], second, clear_began, None),
        "cleared": ([r for r in results if r[0] > cleared + FOLLOW_S], None, None, None),
    }

    def target(route, user: str) -> str:
        return expected_version(route.pick(user)) if route is not None else "alpha@3"

    counts = {}
    for phase, (requests, route, next_began, next_route) in phases.items():
        assert len(requests) >= LATE_REQUESTS, f"{phase}: {len(requests)} requests"
        for _, user, model, _, done in requests:
            wanted = {target(route, user)}
            if next_began is not None and done > next_began:
                wanted.add(target(next_route, user))
            assert model in wanted, f"{phase}: {user} got {model}, the route in force sends it to {wanted}"
        counts[phase] = {m: sum(r[2] == m for r in requests) for m in ("alpha@1", "alpha@2", "alpha@3")}
    counts["requests"] = len(results)
    return counts


def mirror_answers_no_caller(client, registry, url: str, api_key: str, expected: dict, users: int,
                             answered_metric: str) -> None:
    """prod=100 with canary as mirror: every caller gets prod's answer; `answered_metric` (a counter of what the
    engines answered) grows by exactly two per request, and the per-version metrics count the copies under
    `mirror:canary`, apart from the callers' requests."""
    registry.set_route("alpha", {"prod": 100}, mirror="canary")
    complete(client, "alpha@2")  # loaded already: the mirror's first copy does not wait for a load
    time.sleep(FOLLOW_S)  # the cleared route of the test before may be reused for up to --alias-ttl
    before = metric_total(url, api_key, answered_metric)
    counted = metrics_text(url, api_key)
    names = [f"mirrored-{i}" for i in range(users)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda u: complete(client, "alpha", user=u), names))
    for model, ids in got:
        assert model == "alpha@1" and same_answer(ids, expected["alpha@1"]), (model, ids)
    started = time.monotonic()
    while (answered := metric_total(url, api_key, answered_metric) - before) < 2 * users:
        assert time.monotonic() - started < 60, f"{answered} answered ({answered_metric}) for {users} mirrored"
        time.sleep(0.5)
    assert answered == 2 * users, f"{answered} answered ({answered_metric}) for {users} mirrored"
    now = metrics_text(url, api_key)
    assert version_requests(now, 2, "mirror:canary") - version_requests(counted, 2, "mirror:canary") == users
    assert version_requests(now, 1, "prod") - version_requests(counted, 1, "prod") == users
    assert version_requests(now, 2, "canary") == version_requests(counted, 2, "canary")
