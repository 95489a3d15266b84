"""Automatic rollback: take a failing canary out of its route while the server runs (`pipeline serve --auto-rollback`).

A route (`pipeline registry route set NAME prod=90 canary=10`) has a heaviest target (the most weight; the first
listed among equals), the version most callers get, and candidates: every other target with weight above 0. The
watcher sees every answer of a routed request (serve/version_metrics.py passes each one on) and, twice a second,
looks at the last `window_s` seconds of each routed name. A candidate with at least `min_requests` answers there
is rolled back when

- its error rate (4xx + 5xx answers, refusals of its version included) is above `max_error_rate`, or
- the p90 end-to-end time of its 2xx answers is above `max_latency_ratio` times the heaviest target's, both
  having at least `min_requests` 2xx answers in the window.

Rolling back is one `registry.set_route(NAME, {candidate: 0, the others renormalised to 100}, kind="auto_rollback",
reason=..., figures=...)`: the registry's history then says when and why, with the figures, and every server
and replica follows the new route within its TTL, as after a manual change. The watcher logs one warning line.
Only answers given since the route's last change (its `updated_at`) count, so a route set again after a rollback
starts from a clean window. It acts once per route revision and candidate; a registry that refuses or does not
answer is tried again on the next check.

Where it runs: in the process that holds the middleware, i.e. the single server, or the ingress of `--replicas N`
(one process for all replicas: one watcher, one registry write). Enabled by `ENV_ROLLOUT` (JSON of
`RolloutSettings`), which `pipeline serve --auto-rollback` and the pipeline's serve stage set.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

ENV_ROLLOUT = "PIPELINE_SERVE_AUTO_ROLLBACK"
CHECK_EVERY_S = 0.5
MAX_KEPT = 100_000  # answers kept per name: a bound on memory at any traffic, far above a window's worth at 2 cores


@dataclass(frozen=True)
class RolloutSettings:
    """`serve.rollout.*` (config/serve_schema.py holds the defaults and their reasons)."""

    window_s: float = 60.0
    min_requests: int = 20
    max_error_rate: float = 0.05
    max_latency_ratio: float = 2.0


@dataclass(frozen=True)
class Sample:
    at: float  # wall-clock time (compared with the route's updated_at)
    target: str
    version: int | None
    ok: bool
    e2e_s: float


def rollout_env(settings: RolloutSettings | None) -> dict[str, str]:
    """The environment that turns the watcher on in the serving process (empty: off)."""
    return {ENV_ROLLOUT: json.dumps(asdict(settings))} if settings is not None else {}


def settings_from_env() -> RolloutSettings | None:
    text = os.environ.get(ENV_ROLLOUT)
    return RolloutSettings(**json.loads(text)) if text else None


def p90(values: list[float]) -> float | None:
    """The nearest-rank 90th percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, -(-9 * len(ordered) // 10) - 1)]


def without(targets: tuple[tuple[str, int], ...], candidate: str) -> dict[str, int]:
    """The route's weights with `candidate` at 0 and the others scaled to sum to 100 (largest remainder, ties to
    the first listed), in the route's order."""
    rest = [(t, w) for t, w in targets if t != candidate]
    total = sum(w for _, w in rest)
    if total <= 0:
        raise ValueError(f"no other target of the route has weight: cannot take {candidate} out")
    scaled = [(t, w * 100 // total, (w * 100) % total) for t, w in rest]
    short = 100 - sum(base for _, base, _ in scaled)
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i][2])
    bonus = {i for i in order[:short]}
    new = {t: base + (1 if i in bonus else 0) for i, (t, base, _) in enumerate(scaled)}
    return {t: (0 if t == candidate else new[t]) for t, _ in targets}


def heaviest(targets: tuple[tuple[str, int], ...]) -> str:
    most = max(w for _, w in targets)
    return next(t for t, w in targets if w == most)


@dataclass(frozen=True)
class Breach:
    candidate: str
    baseline: str
    reason: str
    figures: dict


def find_breach(route, samples: list[Sample], settings: RolloutSettings, now: float) -> Breach | None:
    """The first candidate of `route` (registry.routes.Route) that breaches `settings` over the answers in
    `samples` given since the route changed and within the window; None when every candidate holds."""
    since = max(now - settings.window_s, float(route.updated_at))
    recent = [s for s in samples if s.at >= since]
    base = heaviest(route.targets)
    base_ok = [s.e2e_s for s in recent if s.target == base and s.ok]
    for target, weight in route.targets:
        if target == base or weight <= 0:
            continue
        mine = [s for s in recent if s.target == target]
        if len(mine) < settings.min_requests:
            continue
        errors = sum(not s.ok for s in mine)
        error_rate = errors / len(mine)
        mine_ok = [s.e2e_s for s in mine if s.ok]
        ratio = None
        if len(mine_ok) >= settings.min_requests and len(base_ok) >= settings.min_requests and p90(base_ok) > 0:
            ratio = p90(mine_ok) / p90(base_ok)
        versions = sorted({s.version for s in mine if s.version is not None})
        figures = {"window_s": settings.window_s, "requests": len(mine), "errors": errors,
                   "error_rate": round(error_rate, 4), "max_error_rate": settings.max_error_rate,
                   "p90_e2e_s": _rounded(p90(mine_ok)), "baseline": base,
                   "baseline_requests": sum(s.target == base for s in recent),
                   "baseline_p90_e2e_s": _rounded(p90(base_ok)), "latency_ratio": _rounded(ratio),
                   "max_latency_ratio": settings.max_latency_ratio, "min_requests": settings.min_requests,
                   "candidate": target, "versions": versions, "weight_before": weight,
                   "route_revision": route.revision}
        seen = f"over the last {settings.window_s:g} s ({len(mine)} answers of {route.name}@{target}"
        seen += f", version {', '.join(map(str, versions))})" if versions else ")"
        if error_rate > settings.max_error_rate:
            return Breach(target, base, f"auto-rollback: {target} failed {errors} of {len(mine)} requests (error rate "
                                        f"{error_rate:.2f} > {settings.max_error_rate:g}) {seen}", figures)
        if ratio is not None and ratio > settings.max_latency_ratio:
            return Breach(target, base, f"auto-rollback: {target}'s p90 end-to-end time is {ratio:.2f}x {base}'s "
                                        f"({p90(mine_ok):.3f} s vs {p90(base_ok):.3f} s; limit "
                                        f"{settings.max_latency_ratio:g}x) {seen}", figures)
    return None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


class AutoRollback:
    """Watches routed answers (`observe`, an Outcome listener) and rolls back breaching candidates in a thread."""

    def __init__(self, registry, settings: RolloutSettings, clock=time.time):
        self.registry = registry
        self.settings = settings
        self.clock = clock
        self.rolled_back: list[tuple[str, str, int]] = []  # (name, candidate, route revision) acted on
        self._samples: dict[str, deque[Sample]] = {}
        self._failed_once: set[tuple[str, str, int]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def observe(self, outcome) -> None:
        """Keep a routed answer (not a mirror's: no caller saw it); starts the checking thread on the first one."""
        target = outcome.route_target
        if not target or target.startswith("mirror:"):
            return
        sample = Sample(self.clock(), target, outcome.version, outcome.ok, outcome.e2e_s)
        with self._lock:
            self._samples.setdefault(outcome.adapter, deque(maxlen=MAX_KEPT)).append(sample)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="auto-rollback", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(CHECK_EVERY_S):
            try:
                self.check()
            except Exception:  # the watcher must outlive a bad check; the next one runs in CHECK_EVERY_S
                log.exception("auto-rollback check failed")

    def check(self) -> list[Breach]:
        """One pass over every routed name with answers in the window; returns the rollbacks it made."""
        now = self.clock()
        with self._lock:
            for samples in self._samples.values():
                while samples and samples[0].at < now - self.settings.window_s:
                    samples.popleft()
            names = {name: list(samples) for name, samples in self._samples.items() if samples}
        made = []
        for name, samples in names.items():
            breach = self._check_name(name, samples, now)
            if breach is not None:
                made.append(breach)
        return made

    def _check_name(self, name: str, samples: list[Sample], now: float) -> Breach | None:
        from ground.errors import RegistryError

        if len(samples) < self.settings.min_requests:
            return None
        candidates = {s.target for s in samples}
        try:
            route = self.registry.get_route(name)  # the registry's route now, not a cached one: we write it back
        except RegistryError as exc:
            log.debug("auto-rollback: cannot read the route of %s: %s", name, exc)
            return None
        if route is None or not candidates & {t for t, w in route.targets if w > 0}:
            return None
        breach = find_breach(route, samples, self.settings, now)
        if breach is None or (name, breach.candidate, route.revision) in self.rolled_back:
            return None
        key = (name, breach.candidate, route.revision)
        try:
            self.registry.set_route(name, without(route.targets, breach.candidate), mirror=route.mirror,
                                    reason=breach.reason, kind="auto_rollback", figures=breach.figures)
        except (RegistryError, ValueError) as exc:
            if key not in self._failed_once:
                self._failed_once.add(key)
                log.error("auto-rollback of %s@%s failed (tried again every %.1f s): %s", name, breach.candidate,
                          CHECK_EVERY_S, exc)
            return None
        self.rolled_back.append(key)
        log.warning("%s; route of %s set to %s", breach.reason, name,
                    " ".join(f"{t}={w}" for t, w in without(route.targets, breach.candidate).items()))
        return breach


def start_from_env(catalog) -> AutoRollback | None:
    """The watcher of this serving process when ENV_ROLLOUT is set (and a catalog serves a registry), else None."""
    settings = settings_from_env()
    if settings is None or catalog is None:
        return None
    from serve import version_metrics

    watcher = AutoRollback(catalog.registry, settings)
    version_metrics.add_listener(watcher.observe)
    log.info("auto-rollback on: %s", settings)
    return watcher
