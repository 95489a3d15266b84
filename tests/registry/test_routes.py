"""Routes (traffic splits) on both stores: set/show/clear, validation, and Route.pick's stickiness and shares."""

from __future__ import annotations

import math
import random

import pytest

from ground.errors import NotFoundError, RegistryError
from registry import open_registry
from registry.routes import Route, parse_weight_args
from tests.synthetic_lora import write_lora

# `reg` (tests/registry/conftest.py) is the local store and a real MLflow server in turn


@pytest.fixture
def three_versions(reg, tmp_path):
    lora = write_lora(tmp_path / "lora", rank=4, alpha=8)
    for _ in range(3):
        reg.publish(lora, "ad")
    reg.set_alias("ad", "prod", 1)
    reg.set_alias("ad", "canary", 2)
    return reg


def test_route_set_show_clear(three_versions):
    reg = three_versions
    assert reg.get_route("ad") is None
    route = reg.set_route("ad", {"prod": 90, "canary": 10}, reason="try v2")
    assert route.targets == (("prod", 90), ("canary", 10)) and route.mirror is None and route.revision == 1
    again = reg.get_route("ad")
    assert again == route  # what was stored, targets in the listed order
    second = reg.set_route("ad", {"canary": 50, "prod": 50, "3": 0}, mirror="3")
    assert second.revision == 2 and second.targets == (("canary", 50), ("prod", 50), ("3", 0))
    assert reg.get_route("ad").mirror == "3"
    reg.clear_route("ad", reason="done")
    assert reg.get_route("ad") is None
    reg.clear_route("ad")  # nothing to clear: no error, no event
    third = reg.set_route("ad", {"1": 100})
    assert third.revision == 4  # counting went on through the clear
    kinds = [e.kind for e in reg.history("ad") if e.kind.startswith("route")]
    assert kinds == ["route_set", "route_set", "route_clear", "route_set"]


@pytest.mark.parametrize("targets, message", [
    ({"prod": 90, "canary": 20}, r"sum to 110 \(prod=90 canary=20\), not 100"),
    ({"prod": 90}, r"sum to 90"),
    ({"prod": 90.0, "canary": 10}, r"weight 90.0 of target `prod` .*not an integer"),
    ({"prod": True, "canary": 99}, r"weight True .*not an integer"),
    ({"prod": 110, "canary": -10}, r"weight -10 of target `canary` .*negative"),
    ({}, r"at least one target"),
    ({"a/b": 100}, r"'a/b' .*neither an alias name nor a version number"),
])
def test_route_weights_refused(tmp_path, targets, message):
    """Checked before either store is touched (the same code for both), so the local store is enough here."""
    reg = open_registry(str(tmp_path / "store"), mirror_mlflow=False)
    reg.publish(write_lora(tmp_path / "lora", rank=4, alpha=8), "ad", alias="prod")
    reg.set_alias("ad", "canary", 1)
    with pytest.raises(RegistryError, match=message):
        reg.set_route("ad", targets)
    assert reg.get_route("ad") is None


def test_route_targets_must_resolve(three_versions):
    reg = three_versions
    with pytest.raises(NotFoundError, match=r"Route target `nope` of `ad` is neither an alias of it nor one of its "
                                            r"versions \(aliases: canary -> 2, prod -> 1; versions: 1-3\)"):
        reg.set_route("ad", {"prod": 90, "nope": 10})
    with pytest.raises(NotFoundError, match=r"Route target `9` .*alias set ad 9 VERSION"):
        reg.set_route("ad", {"prod": 90, "9": 10})
    with pytest.raises(NotFoundError, match="Mirror `shadow`"):
        reg.set_route("ad", {"prod": 100}, mirror="shadow")
    with pytest.raises(NotFoundError, match="`other` does not exist"):
        reg.set_route("other", {"prod": 100})
    assert reg.get_route("ad") is None and reg.history("ad")[-1].kind == "alias_set"  # refusals record nothing


def test_cli_words_parsed_with_messages():
    assert parse_weight_args("ad", ["prod=90", "canary=10"]) == {"prod": 90, "canary": 10}
    for words, message in [(["prod=ninety"], r"weight 'ninety' of target 'prod' is not an integer"),
                           (["prod=9.5"], r"weight '9.5'"), (["prod"], r"'prod' is not of the form TARGET=WEIGHT"),
                           (["prod=50", "prod=50"], r"`prod` is given twice")]:
        with pytest.raises(RegistryError, match=message):
            parse_weight_args("ad", words)


def _route(weights: dict[str, int]) -> Route:
    return Route("arith", tuple(weights.items()), None, 1, 0.0)


def test_pick_is_sticky_and_never_picks_weight_zero():
    route = _route({"prod": 90, "canary": 10, "old": 0})
    keys = [f"user-{i}" for i in range(2000)]
    first = [route.pick(k) for k in keys]
    assert [route.pick(k) for k in keys] == first  # same caller, same target while the route is unchanged
    assert "old" not in first
    rng = random.Random(0)
    assert "old" not in {route.pick(None, rng) for _ in range(2000)}
    # a fresh Route object (another process, another replica) agrees: the hash is not Python's salted hash()
    assert [Route("arith", route.targets, None, 2, 1.0).pick(k) for k in keys] == first


def _within_binomial_999(hits: int, n: int, p: float) -> bool:
    z = 3.2905  # two-sided 99.9%
    sd = math.sqrt(n * p * (1 - p))
    return abs(hits - n * p) <= z * sd


@pytest.mark.parametrize("canary", [10, 50, 1])
def test_pick_shares_of_distinct_keys(canary):
    route = _route({"prod": 100 - canary, "canary": canary})
    n = 10_000
    hits = sum(route.pick(f"caller-{i}") == "canary" for i in range(n))
    assert _within_binomial_999(hits, n, canary / 100), hits
    rng = random.Random(1)
    keyless = sum(route.pick(None, rng) == "canary" for _ in range(n))
    assert _within_binomial_999(keyless, n, canary / 100), keyless


def test_pick_depends_on_the_name():
    """Two adapters routed alike do not send the same callers to their canaries (the hash covers the name)."""
    a, b = _route({"prod": 50, "canary": 50}), Route("other", (("prod", 50), ("canary", 50)), None, 1, 0.0)
    same = sum(a.pick(f"u{i}") == b.pick(f"u{i}") for i in range(2000))
    assert 850 < same < 1150
