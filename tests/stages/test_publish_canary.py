"""The publish stage as a canary: `publish.alias=canary publish.canary_weight=W` ends with the name routed
prod=100-W canary=W (when `prod` exists; otherwise the alias alone and a log line that says why), on the local
store and a real MLflow server store. The lineage records what `pipeline promote`'s held-out gate needs."""

from __future__ import annotations

import logging

import pytest

from config import load_config
from ground.errors import ConfigError
from ground.logs import CONSOLE_LOGGER
from ground.model_files import fingerprint
from registry import open_registry
from stages.publish import publish
from tests.registry_stores import store_uri  # noqa: F401  (the fixture: a local store, then the MLflow one)
from tests.synthetic_lora import write_lora

NAME = "adder"


def _publish_run(store_uri, tiny_model_dir, tmp_path, run_id, seed, **publish_keys):
    overrides = [f"registry.uri={store_uri}", f"publish.name={NAME}"]
    overrides += [f"publish.{k}={v}" for k, v in publish_keys.items()]
    cfg = load_config(None, overrides)
    adapter = write_lora(tmp_path / f"adapter-{run_id}", seed=seed)
    staged = {"source_dir": str(tiny_model_dir), "fingerprint": fingerprint(tiny_model_dir)}
    train = {"adapter_dir": str(adapter), "steps": 1}
    evaluation = {"publish": True, "decision": "publish: test", "start_reward": 0.1, "adapter_reward": 0.5}
    return publish(cfg, run_id, staged, train, evaluation)


def test_canary_publish_routes_a_share_of_the_name(store_uri, tiny_model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=CONSOLE_LOGGER)
    first = _publish_run(store_uri, tiny_model_dir, tmp_path, "run-1", 1, alias="prod")
    assert first["route"] is None
    out = _publish_run(store_uri, tiny_model_dir, tmp_path, "run-2", 2, alias="canary", canary_weight=10)
    assert out["route"] == "prod=90 canary=10"
    reg = open_registry(store_uri, mirror_mlflow=False)
    route = reg.get_route(NAME)
    assert dict(route.targets) == {"prod": 90, "canary": 10}
    assert reg.aliases(NAME) == {"prod": first["version"], "canary": out["version"]}
    assert "route_set" in [e.kind for e in reg.history(NAME)]
    lineage = reg.get_version(NAME, out["version"]).lineage
    assert lineage["data_files"]["val"] and lineage["max_response_length"]
    assert lineage["reward"] == {"scorer": None, "custom_reward_function": None}
    assert "prod=90 canary=10" in caplog.text


def test_canary_publish_without_prod_sets_the_alias_and_says_why(tiny_model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=CONSOLE_LOGGER)
    uri = str(tmp_path / "store")
    out = _publish_run(uri, tiny_model_dir, tmp_path, "run-1", 1, alias="canary", canary_weight=10)
    reg = open_registry(uri, mirror_mlflow=False)
    assert out["route"] is None and reg.get_route(NAME) is None
    assert reg.aliases(NAME) == {"canary": out["version"]}
    assert "no `prod` alias to split against" in caplog.text


def test_canary_weight_needs_an_alias_other_than_prod():
    with pytest.raises(ConfigError, match="publish.canary_weight=10 .* set publish.alias=canary"):
        load_config(None, ["publish.alias=prod", "publish.canary_weight=10"])
    with pytest.raises(ConfigError, match="canary_weight"):
        load_config(None, ["publish.alias=canary", "publish.canary_weight=100"])
