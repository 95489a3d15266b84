"""The server's registry view without a server: references, caching of moving refs, base checks, listing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ground.errors import NotFoundError, RegistryError
from registry import open_registry
from tests.synthetic_lora import write_lora
from ground.vllm_lora import stable_lora_id
from serve.catalog import AdapterCatalog, BaseMismatchError
from ground.model_files import fingerprint


@pytest.fixture
def reg(tmp_path, tiny_model_dir):
    registry = open_registry(str(tmp_path / "reg"))
    for seed, name in enumerate(["alpha", "alpha", "beta"]):
        registry.publish(write_lora(tmp_path / f"src{seed}", seed=seed), name, base_dir=tiny_model_dir)
    registry.set_alias("alpha", "prod", 1)
    registry.publish(write_lora(tmp_path / "other"), "foreign", base_fingerprint="ab" * 32)
    return registry


@pytest.fixture
def catalog(reg, tiny_model_dir):
    return AdapterCatalog(reg, fingerprint(tiny_model_dir), "tiny", ttl_s=0.3)


def test_refs_resolve_to_pinned_versions(catalog):
    assert catalog.lookup("alpha").ref == "alpha@2"
    assert catalog.lookup("alpha@1").ref == "alpha@1"
    assert catalog.lookup("alpha@prod").ref == "alpha@1"
    assert catalog.lookup("alpha@prod").path.endswith(os.path.join("alpha", "versions", "1"))


def test_alias_move_is_seen_after_ttl(reg, tiny_model_dir):
    now = [1000.0]
    catalog = AdapterCatalog(reg, fingerprint(tiny_model_dir), "tiny", ttl_s=1.0, clock=lambda: now[0])
    assert catalog.lookup("alpha@prod").version == 1
    reg.set_alias("alpha", "prod", 2)
    now[0] += 0.9
    assert catalog.lookup("alpha@prod").version == 1  # cached: bounded staleness, not a lookup per request
    now[0] += 0.2
    assert catalog.lookup("alpha@prod").version == 2
    assert catalog.lookup("alpha@1").version == 1  # pinned references never change


def test_errors_name_what_is_wrong(catalog):
    with pytest.raises(NotFoundError, match="alpha, beta"):
        catalog.lookup("nope")
    with pytest.raises(NotFoundError, match="versions of `alpha`: 1-2"):
        catalog.lookup("alpha@9")
    for bad in ("../etc", "a/b", "/abs", ".hidden", "x@../y"):
        with pytest.raises(RegistryError, match="Invalid"):
            catalog.lookup(bad)
    with pytest.raises(BaseMismatchError) as info:
        catalog.lookup("foreign")
    assert "abababababababab" in str(info.value) and catalog.base_fingerprint[:16] in str(info.value)


def test_servable_lists_matching_versions_names_and_aliases(catalog):
    ids = [card["id"] for card in catalog.servable()]
    assert ids == ["alpha@1", "alpha@2", "alpha", "alpha@prod", "beta@1", "beta"]


def test_lora_ids_are_stable_across_processes():
    assert stable_lora_id("alpha@1") == stable_lora_id("alpha@1") > 0
    assert stable_lora_id("alpha@1") != stable_lora_id("alpha@2")
    # stable across processes (Python's hash() is salted per process)
    code = "from ground.vllm_lora import stable_lora_id; print(stable_lora_id('alpha@1'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == stable_lora_id("alpha@1")


def test_plugin_is_inert_outside_pipeline_serve(monkeypatch):
    """vLLM loads our plugin in every vLLM process: without PIPELINE_SERVE_REGISTRY it registers nothing."""
    from importlib.metadata import entry_points

    from vllm.lora.resolver import LoRAResolverRegistry

    from serve.resolver import RESOLVER_NAME, register

    plugins = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "serve.resolver:register" in plugins  # run `pip install -e . --no-deps` if this fails
    monkeypatch.delenv("PIPELINE_SERVE_REGISTRY", raising=False)
    register()
    assert RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers()
    monkeypatch.setenv("PIPELINE_SERVE_REGISTRY", "/not-opened-until-the-first-request")
    try:
        register()
        assert RESOLVER_NAME in LoRAResolverRegistry.get_supported_resolvers()
    finally:
        LoRAResolverRegistry.resolvers.pop(RESOLVER_NAME, None)


def test_rank_above_server_maximum_is_refused_with_the_fix(reg, tiny_model_dir, tmp_path):
    from serve.catalog import RankTooLargeError

    reg.publish(write_lora(tmp_path / "big", rank=16), "big", base_dir=tiny_model_dir)
    catalog = AdapterCatalog(reg, fingerprint(tiny_model_dir), "tiny", max_lora_rank=8)
    assert catalog.lookup("alpha").rank == 4
    with pytest.raises(RankTooLargeError, match="rank 16, above this server's max_lora_rank 8"):
        catalog.lookup("big")
    assert not any(card["id"].startswith("big") for card in catalog.servable())


def test_name_is_listed_only_when_its_latest_version_is_servable(reg, catalog, tmp_path):
    reg.publish(write_lora(tmp_path / "other2"), "beta", base_fingerprint="cd" * 32)  # beta@2: another base
    ids = [card["id"] for card in catalog.servable()]
    assert "beta@1" in ids and "beta@2" not in ids and "beta" not in ids  # `beta` means beta@2 now
