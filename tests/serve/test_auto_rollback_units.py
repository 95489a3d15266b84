"""Automatic rollback without a server: which candidate breaches, the weights it leaves, and the one registry write
(a real local registry; the end-to-end test against a real server is in tests/serve/test_version_metrics.py)."""

from __future__ import annotations

import logging

import pytest

from registry import open_registry
from registry.routes import Route
from serve.auto_rollback import (AutoRollback, RolloutSettings, Sample, find_breach, p90, rollout_env,
                                 settings_from_env, without)
from serve.version_metrics import Outcome
from tests.synthetic_lora import write_lora

SETTINGS = RolloutSettings(window_s=30, min_requests=5, max_error_rate=0.2, max_latency_ratio=2.0)
NOW = 1_000_000.0


def _route(weights: dict[str, int], updated_at: float = NOW - 100, revision: int = 3) -> Route:
    return Route("ad", tuple(weights.items()), None, revision, updated_at)


def _samples(target: str, n: int, ok: bool = True, e2e_s: float = 0.1, at: float = NOW - 1) -> list[Sample]:
    return [Sample(at, target, 2, ok, e2e_s) for _ in range(n)]


@pytest.mark.parametrize("weights, candidate, expected", [
    ({"prod": 90, "canary": 10}, "canary", {"prod": 100, "canary": 0}),
    ({"a": 50, "b": 30, "c": 20}, "c", {"a": 63, "b": 37, "c": 0}),  # 62.5 / 37.5: the tie goes to the first
    ({"a": 34, "b": 33, "c": 33}, "b", {"a": 51, "b": 0, "c": 49}),
    ({"a": 50, "b": 50}, "b", {"a": 100, "b": 0}),
    ({"prod": 80, "x": 0, "canary": 20}, "canary", {"prod": 100, "x": 0, "canary": 0}),
])
def test_without_keeps_order_and_sums_to_100(weights, candidate, expected):
    got = without(tuple(weights.items()), candidate)
    assert got == expected and list(got) == list(weights) and sum(got.values()) == 100


def test_an_erring_candidate_breaches_once_it_has_min_requests():
    route = _route({"prod": 90, "canary": 10})
    assert find_breach(route, _samples("prod", 20) + _samples("canary", 4, ok=False), SETTINGS, NOW) is None
    breach = find_breach(route, _samples("prod", 20) + _samples("canary", 5, ok=False), SETTINGS, NOW)
    assert breach.candidate == "canary" and breach.baseline == "prod"
    assert breach.figures["requests"] == 5 and breach.figures["errors"] == 5 and breach.figures["error_rate"] == 1.0
    assert "failed 5 of 5 requests" in breach.reason and "error rate 1.00 > 0.2" in breach.reason
    # exactly at the limit holds (1 of 5 = 0.2), above it breaches
    assert find_breach(route, _samples("canary", 4) + _samples("canary", 1, ok=False), SETTINGS, NOW) is None
    assert find_breach(route, _samples("canary", 3) + _samples("canary", 2, ok=False), SETTINGS, NOW) is not None


def test_the_heaviest_target_and_weight_zero_targets_are_never_judged():
    failing_prod = _samples("prod", 50, ok=False)
    assert find_breach(_route({"prod": 90, "canary": 10}), failing_prod, SETTINGS, NOW) is None
    assert find_breach(_route({"prod": 100, "canary": 0}), _samples("canary", 50, ok=False), SETTINGS, NOW) is None
    # equal weights: the first listed is the baseline
    assert find_breach(_route({"a": 50, "b": 50}), _samples("a", 9, ok=False), SETTINGS, NOW) is None
    assert find_breach(_route({"a": 50, "b": 50}), _samples("b", 9, ok=False), SETTINGS, NOW).candidate == "b"


def test_answers_outside_the_window_or_before_the_route_changed_do_not_count():
    old = _samples("canary", 10, ok=False, at=NOW - 31)
    assert find_breach(_route({"prod": 90, "canary": 10}), old, SETTINGS, NOW) is None
    before_change = _samples("canary", 10, ok=False, at=NOW - 5)
    assert find_breach(_route({"prod": 90, "canary": 10}, updated_at=NOW - 4), before_change, SETTINGS, NOW) is None


def test_a_slow_candidate_breaches_the_latency_ratio():
    route = _route({"prod": 90, "canary": 10})
    fast, slow = _samples("prod", 10, e2e_s=0.1), _samples("canary", 5, e2e_s=0.25)
    breach = find_breach(route, fast + slow, SETTINGS, NOW)
    assert breach is not None and breach.figures["latency_ratio"] == 2.5 and "2.50x prod's" in breach.reason
    assert find_breach(route, fast + _samples("canary", 5, e2e_s=0.2), SETTINGS, NOW) is None  # 2.0x holds
    # too few prod answers to compare with: no verdict on latency
    assert find_breach(route, _samples("prod", 4, e2e_s=0.1) + slow, SETTINGS, NOW) is None


def test_p90_is_the_nearest_rank():
    assert p90([]) is None and p90([3.0]) == 3.0
    assert p90([float(i) for i in range(1, 11)]) == 9.0 and p90([float(i) for i in range(1, 101)]) == 90.0


def test_settings_travel_through_the_environment(monkeypatch):
    assert rollout_env(None) == {}
    for key, value in rollout_env(SETTINGS).items():
        monkeypatch.setenv(key, value)
    assert settings_from_env() == SETTINGS


def test_the_watcher_rolls_back_once_with_the_event_in_history(tmp_path, caplog):
    """A real local registry: 5 failed canary answers -> one set_route(kind=auto_rollback) with its figures and
    one warning; more failures of the same (now weight-0) candidate change nothing."""
    reg = open_registry(str(tmp_path / "store"), mirror_mlflow=False)
    lora = write_lora(tmp_path / "lora", rank=4, alpha=8)
    for _ in range(2):
        reg.publish(lora, "ad")
    reg.set_alias("ad", "prod", 1)
    reg.set_alias("ad", "canary", 2)
    reg.set_route("ad", {"prod": 90, "canary": 10}, mirror="canary")
    clock = [reg.get_route("ad").updated_at + 1]
    watcher = AutoRollback(reg, SETTINGS, clock=lambda: clock[0])
    watcher._thread = object()  # checks run by hand below, not in the background thread
    for _ in range(20):
        watcher.observe(Outcome("ad", 1, "prod", 200, 0.1, 0.1))
    for _ in range(4):
        watcher.observe(Outcome("ad", 2, "canary", 422, None, 0.01))
    watcher.observe(Outcome("ad", 2, "mirror:canary", 500, None, 0.01))  # a mirror's answers judge nothing
    assert watcher.check() == [] and reg.get_route("ad").weights == {"prod": 90, "canary": 10}
    watcher.observe(Outcome("ad", 2, "canary", 422, None, 0.01))
    with caplog.at_level(logging.WARNING, logger="serve.auto_rollback"):
        made = watcher.check()
        clock[0] += 1
        watcher.observe(Outcome("ad", 2, "canary", 422, None, 0.01))
        assert watcher.check() == []
    assert [b.candidate for b in made] == ["canary"]
    route = reg.get_route("ad")
    assert route.weights == {"prod": 100, "canary": 0} and route.mirror == "canary"
    events = [e for e in reg.history("ad") if e.kind == "auto_rollback"]
    assert len(events) == 1 and "failed 5 of 5 requests" in events[0].reason
    assert events[0].figures["errors"] == 5 and events[0].figures["versions"] == [2]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "route of ad set to prod=100 canary=0" in warnings[0].getMessage()


def test_the_serve_stage_passes_the_rollout_keys(monkeypatch):
    """`serve.rollout.*` reach the server's environment only with `auto_rollback` on, every value as set."""
    from config.loader import load_config
    from stages.serve_stage import rollout_environment

    assert rollout_environment(load_config(None, [])) == {}
    cfg = load_config(None, ["serve.rollout.auto_rollback=true", "serve.rollout.window_s=12",
                             "serve.rollout.min_requests=7", "serve.rollout.max_error_rate=0.5",
                             "serve.rollout.max_latency_ratio=3"])
    for key, value in rollout_environment(cfg).items():
        monkeypatch.setenv(key, value)
    assert settings_from_env() == RolloutSettings(window_s=12, min_requests=7, max_error_rate=0.5,
                                                  max_latency_ratio=3)


def test_the_cli_and_the_config_have_the_same_defaults():
    from config.serve_schema import RolloutConfig

    config_defaults = {name: field.default for name, field in RolloutConfig.model_fields.items()}
    assert config_defaults.pop("auto_rollback") is False
    assert RolloutSettings(**config_defaults) == RolloutSettings()
