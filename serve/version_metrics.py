"""Metrics per adapter version: what each `NAME@V` answered, how fast, with how many tokens, through which route target.

vLLM has no per-adapter metrics (its one LoRA metric packs the running adapters' names into one label), so the
middleware (serve/middleware.py) measures every request it pinned to a registry version and `/metrics` (with the
API key) gains, in Prometheus text:

- `lora_pipeline_adapter_requests_total{adapter,version,route_target,status_class}`: every answered request, by
  status class ("2xx", "4xx", "5xx"). A request the middleware refused after pinning it (its version's files
  changed since it was loaded: 422; deleted: 404) counts against that version.
- `lora_pipeline_adapter_ttft_seconds`, `lora_pipeline_adapter_e2e_seconds` histograms `{adapter,version,
  route_target}`, of answers with a 2xx status only (a refusal is fast and would flatter a failing version).
  TTFT is the time to the first chunk of a streamed answer; a non-streamed answer arrives whole, so its TTFT is
  its end-to-end time.
- `lora_pipeline_adapter_prompt_tokens_total`, `lora_pipeline_adapter_completion_tokens_total`, from the
  answer's `usage` (a stream carries one only with `stream_options: {"include_usage": true}`).

`route_target` is the route's target string ("prod", "7") when a bare `NAME` followed its route, "" otherwise,
and "mirror:<target>" for the shadow copies of serve/mirror.py, whose answers no caller sees. Times are measured
from the moment the middleware passes the request on (its body read and checked) to the last byte sent.

In `--replicas N` mode the same middleware wraps the one ingress, so these are aggregated over every replica by
the ingress (one process), and `/metrics` there shows them alongside the ingress's own counters.

`read_version_stats(url, api_key)` reads them back per version (for `pipeline serve status` and the online gate
of `pipeline promote`), with p50/p90 estimated from the histogram buckets as Prometheus' `histogram_quantile` does.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field

from serve.response_watch import ResponseWatch

log = logging.getLogger(__name__)

PREFIX = "lora_pipeline_adapter_"
# seconds; the tiny model on 2 CPU cores answers in 0.05-5 s, a 7B on a GPU in 0.02-60 s
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
USAGE_TAIL_BYTES = 16 << 10  # an answer's `usage` is in its last bytes (JSON body, or the last SSE event)
METRICS_PATHS = ("/metrics", "/metrics/")
_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_TOKENS = {name: re.compile(rb'"' + name.encode() + rb'"\s*:\s*(\d+)') for name in ("prompt_tokens",
                                                                                     "completion_tokens")}


@dataclass(frozen=True)
class Outcome:
    """One answered request of a registry version."""

    adapter: str
    version: int | None  # None: refused before the server knew which version the reference meant
    route_target: str
    status: int
    ttft_s: float | None
    e2e_s: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class _Histogram:
    def __init__(self):
        self.counts = [0] * (len(BUCKETS_S) + 1)  # the last is +Inf
        self.total = 0.0

    def add(self, value: float) -> None:
        self.total += value
        for i, bound in enumerate(BUCKETS_S):
            if value <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1


@dataclass
class _Series:
    by_class: dict[str, int] = field(default_factory=dict)
    ttft: _Histogram = field(default_factory=_Histogram)
    e2e: _Histogram = field(default_factory=_Histogram)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class VersionMetrics:
    """The counters and histograms of one server process; `record` is thread-safe, `render` gives /metrics text."""

    def __init__(self):
        self._series: dict[tuple[str, str, str], _Series] = {}
        self._lock = threading.Lock()

    def record(self, outcome: Outcome) -> None:
        key = (outcome.adapter, "" if outcome.version is None else str(outcome.version), outcome.route_target)
        status_class = f"{outcome.status // 100}xx"
        with self._lock:
            series = self._series.setdefault(key, _Series())
            series.by_class[status_class] = series.by_class.get(status_class, 0) + 1
            if outcome.ok:
                series.e2e.add(outcome.e2e_s)
                series.ttft.add(outcome.ttft_s if outcome.ttft_s is not None else outcome.e2e_s)
            series.prompt_tokens += outcome.prompt_tokens or 0
            series.completion_tokens += outcome.completion_tokens or 0

    def render(self) -> str:
        with self._lock:
            items = sorted(self._series.items())
            lines = [f"# HELP {PREFIX}requests_total Requests answered per adapter version, by status class.",
                     f"# TYPE {PREFIX}requests_total counter"]
            for key, series in items:
                for status_class, n in sorted(series.by_class.items()):
                    lines.append(f"{PREFIX}requests_total{{{_labels(key)},status_class=\"{status_class}\"}} {n}")
            for metric, what in (("ttft", "Time to the first chunk of 2xx answers (non-streamed: end to end)"),
                                 ("e2e", "End-to-end time of 2xx answers")):
                lines += [f"# HELP {PREFIX}{metric}_seconds {what}, per adapter version.",
                          f"# TYPE {PREFIX}{metric}_seconds histogram"]
                for key, series in items:
                    lines += _histogram_lines(f"{PREFIX}{metric}_seconds", _labels(key), getattr(series, metric))
            for metric in ("prompt_tokens", "completion_tokens"):
                lines += [f"# HELP {PREFIX}{metric}_total {metric.replace('_', ' ').capitalize()} from the answers' "
                          "usage, per adapter version.", f"# TYPE {PREFIX}{metric}_total counter"]
                lines += [f"{PREFIX}{metric}_total{{{_labels(key)}}} {getattr(series, metric)}"
                          for key, series in items]
        return "\n".join(lines) + "\n"


def _labels(key: tuple[str, str, str]) -> str:
    adapter, version, route_target = (_escape(part) for part in key)
    return f'adapter="{adapter}",version="{version}",route_target="{route_target}"'


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _histogram_lines(metric: str, labels: str, histogram: _Histogram) -> list[str]:
    lines, cumulative = [], 0
    for bound, count in zip(list(BUCKETS_S) + ["+Inf"], histogram.counts):
        cumulative += count
        lines.append(f'{metric}_bucket{{{labels},le="{bound}"}} {cumulative}')
    lines.append(f"{metric}_sum{{{labels}}} {histogram.total:.6f}")
    lines.append(f"{metric}_count{{{labels}}} {cumulative}")
    return lines


# ------------------------------------------------------------------------------------ the process's own metrics
METRICS = VersionMetrics()
_listeners: list = []  # called with every Outcome (serve/auto_rollback.py watches the route targets)


_extra_metrics: list = []  # callables returning more /metrics text (serve/capture.py's counters)


def add_metrics_text(render) -> None:
    if render not in _extra_metrics:
        _extra_metrics.append(render)


def add_listener(listener) -> None:
    _listeners.append(listener)


def remove_listener(listener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def observe(*, adapter: str, version: int | None, route_target: str, status: int, ttft_s: float | None,
            e2e_s: float, prompt_tokens: int | None = None, completion_tokens: int | None = None) -> None:
    """Count one answered request (the middleware's requests and serve/mirror.py's copies)."""
    outcome = Outcome(adapter, version, route_target, int(status), ttft_s, e2e_s, prompt_tokens, completion_tokens)
    METRICS.record(outcome)
    for listener in list(_listeners):
        try:
            listener(outcome)
        except Exception:  # a listener's fault must not cost the request its answer
            log.exception("per-version metrics listener failed")


# ------------------------------------------------------------------------------------ ASGI side (the middleware)
class _Answer(ResponseWatch):
    """Watches a request's response on its way out: status, first body chunk, end, and the tail of the body."""

    def __init__(self, send):
        super().__init__(send, tail_bytes=USAGE_TAIL_BYTES)

    def usage(self) -> tuple[int | None, int | None]:
        """(prompt tokens, completion tokens) of the last `usage` object in the body's tail, else (None, None).
        A `"usage"` inside generated text is escaped (`\\"usage\\"`), so it never matches."""
        found = None
        for found in _USAGE.finditer(self.tail):
            pass
        if found is None:
            return None, None
        rest = self.tail[found.end():]
        numbers = [_TOKENS[name].search(rest) for name in ("prompt_tokens", "completion_tokens")]
        return tuple(int(m.group(1)) if m else None for m in numbers)


async def recorded(handler, scope, receive, send, routed_key: str) -> None:
    """Run `handler(scope, receive, send)` (the middleware's request path) and count its answer when the middleware
    pinned the request to a version: it then sets `scope[routed_key]` (serve.middleware.ROUTED_KEY) to
    {"adapter", "version", "route_target", ...}."""
    answer = _Answer(send)
    started = time.monotonic()
    failed = False
    try:
        await handler(scope, receive, answer.send)
    except BaseException:
        failed = True  # the app raised: Starlette's outer error handler answers 500 unless something was sent
        raise
    finally:
        routed = scope.get(routed_key)
        if routed is not None and (answer.status or failed):
            ended = answer.finished_at or time.monotonic()
            e2e = ended - started
            ttft = (answer.first_chunk_at or ended) - started if answer.streamed else e2e
            prompt, completion = answer.usage()
            try:
                observe(adapter=routed["adapter"], version=routed["version"], route_target=routed["route_target"],
                        status=answer.status or 500, ttft_s=ttft, e2e_s=e2e, prompt_tokens=prompt,
                        completion_tokens=completion)
            except Exception:
                log.exception("could not record a request in the per-version metrics")


async def with_version_metrics(app, scope, receive, send) -> None:
    """`GET /metrics`: the app's own metrics (vLLM's, or the ingress's) followed by the per-version ones."""
    # uncompressed: the text is appended (prometheus_client gzips when the client accepts it)
    scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"accept-encoding"]}

    async def extended(watch: ResponseWatch) -> None:
        body = watch.body
        if watch.status == 200:
            own = body.rstrip(b"\n") + b"\n" if body.strip() else b""
            body = own + METRICS.render().encode() + "".join(f() for f in _extra_metrics).encode()
        await watch.replace(body, status=watch.start.get("status", 500))

    await app(scope, receive, ResponseWatch(send, hold=True, on_complete=extended).send)


# ------------------------------------------------------------------------------------ reading them back
@dataclass(frozen=True)
class VersionStats:
    """One adapter version's figures as a server's /metrics has them (since that server started)."""

    adapter: str
    version: int | None
    requests: int
    errors: int  # 4xx + 5xx answers
    ttft_p50: float | None  # seconds, None without a 2xx answer
    ttft_p90: float | None
    e2e_p50: float | None
    e2e_p90: float | None
    prompt_tokens: int
    completion_tokens: int
    route_targets: tuple[str, ...] = ()  # the route targets it was reached through ("" for exact references)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0  # a version appears once it answered


_SAMPLE = re.compile(r'^(?P<metric>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>.*)\}\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(metric, labels, value) of every per-version sample in a /metrics text."""
    out = []
    for line in text.splitlines():
        if not line.startswith(PREFIX):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        labels = {k: v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
                  for k, v in _LABEL.findall(match["labels"])}
        out.append((match["metric"], labels, float(match["value"])))
    return out


def stats_from_text(text: str, by_route_target: bool = False) -> dict[tuple, VersionStats]:
    """VersionStats per (adapter, version), or per (adapter, version, route_target) with `by_route_target`."""
    groups: dict[tuple, dict] = {}
    for metric, labels, value in parse_samples(text):
        version = int(labels["version"]) if labels.get("version", "").isdigit() else None
        key = (labels.get("adapter", ""), version) + ((labels.get("route_target", ""),) if by_route_target else ())
        group = groups.setdefault(key, {"requests": 0, "errors": 0, "prompt": 0, "completion": 0, "targets": set(),
                                        "ttft": {}, "e2e": {}})
        group["targets"].add(labels.get("route_target", ""))
        if metric == PREFIX + "requests_total":
            group["requests"] += int(value)
            if labels.get("status_class") in ("4xx", "5xx"):
                group["errors"] += int(value)
        elif metric == PREFIX + "prompt_tokens_total":
            group["prompt"] += int(value)
        elif metric == PREFIX + "completion_tokens_total":
            group["completion"] += int(value)
        else:
            for name in ("ttft", "e2e"):
                if metric == f"{PREFIX}{name}_seconds_bucket":
                    bound = float(labels["le"])  # "+Inf" parses as inf
                    group[name][bound] = group[name].get(bound, 0) + value
    out = {}
    for key, g in groups.items():
        out[key] = VersionStats(
            adapter=key[0], version=key[1], requests=g["requests"], errors=g["errors"],
            ttft_p50=bucket_quantile(0.5, g["ttft"]), ttft_p90=bucket_quantile(0.9, g["ttft"]),
            e2e_p50=bucket_quantile(0.5, g["e2e"]), e2e_p90=bucket_quantile(0.9, g["e2e"]),
            prompt_tokens=g["prompt"], completion_tokens=g["completion"], route_targets=tuple(sorted(g["targets"])))
    return out


def bucket_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The q-quantile from cumulative bucket counts {upper bound: count}, interpolated linearly inside the bucket
    it falls in (Prometheus' histogram_quantile); the highest finite bound when it falls in +Inf; None if empty."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


def metrics_url(url: str) -> str:
    """The /metrics address of a server given as its OpenAI base URL (`http://HOST:PORT/v1`) or its root."""
    root = url.rstrip("/")
    root = root[: -len("/v1")] if root.endswith("/v1") else root
    return root + "/metrics"


def fetch_metrics_text(url: str, api_key: str | None, timeout_s: float = 10.0) -> str:
    """The /metrics text of the server at `url`. Raises StageError naming the address and the fix."""
    import urllib.error
    import urllib.request

    from ground.errors import StageError

    address = metrics_url(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(address, headers=headers), timeout=timeout_s) as reply:
            return reply.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        hint = (" Pass the server's key with --api-key (or $PIPELINE_SERVE_API_KEY)."
                if exc.code == 401 else "")
        raise StageError(f"{address} answered HTTP {exc.code}.{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StageError(f"Cannot read the metrics of the server at {address}: {reason}. Is `pipeline serve` "
                         "running there? Pass its address with --url.") from None


def read_version_stats(url: str, api_key: str | None) -> dict[tuple[str, int], VersionStats]:
    """Per (adapter, version): requests, errors, error rate, TTFT and e2e p50/p90, tokens, from the server at `url`
    (its OpenAI base URL or its root). Raises StageError when the server cannot be read."""
    return stats_from_text(fetch_metrics_text(url, api_key))
