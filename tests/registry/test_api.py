"""The Python API on real folders: publish, resolve, aliases, list, delete, verify, validation refusals."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from ground.errors import NotFoundError, RegistryError
from registry import open_registry, parse_ref
from registry.refs import check_version
from tests.synthetic_lora import write_lora
from tests.registry.conftest import stored_file

# `reg` (tests/registry/conftest.py) is the local store and a real MLflow server in turn: the same contract


@pytest.fixture
def lora(tmp_path):
    return write_lora(tmp_path / "lora", rank=4, alpha=8)


def test_parse_ref():
    assert parse_ref("a") == ("a", None, None)
    assert parse_ref("a@latest") == ("a", None, None)
    assert parse_ref("a@7") == ("a", 7, None)
    assert parse_ref("a.b-c_d@prod") == ("a.b-c_d", None, "prod")
    assert parse_ref("models:/a/3") == ("a", 3, None)
    assert parse_ref("models:/a@prod") == ("a", None, "prod")
    for bad in ["", "a@", "../x", "a/b", "a@0", "a@v2", "a@../x", ".hidden", "x" * 200, "a@b/c"]:
        with pytest.raises(RegistryError):
            parse_ref(bad)


def test_versions_are_ascii_digits_and_long_names_are_cut_in_messages():
    for bad in ["a@१", "a@٣", "a@1_0", "a@ 1"]:
        with pytest.raises(RegistryError, match="Invalid"):
            parse_ref(bad)
    with pytest.raises(RegistryError, match="ASCII digits"):
        parse_ref("alpha@१")
    with pytest.raises(RegistryError) as info:
        parse_ref("x" * 1_000_000)
    assert len(str(info.value)) < 400 and "1000002 characters" in str(info.value)


def test_a_version_of_thousands_of_digits_is_refused_by_name_not_by_int():
    # int() raises a bare ValueError past 4,300 digits; the reference must get the registry's own error
    for ref in ["a@" + "9" * 5000, "a@" + "1" * 19]:
        with pytest.raises(RegistryError, match="more than 18 digits"):
            parse_ref(ref)
    with pytest.raises(RegistryError, match="more than 18 digits"):
        check_version("7" * 5000)
    assert parse_ref("a@" + "0" * 30 + "12") == ("a", 12, None)


def test_uri_precedence(tmp_path, monkeypatch, lora):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PIPELINE_REGISTRY", raising=False)
    assert open_registry(mirror_mlflow=False).store.root == tmp_path / "registry-store"
    monkeypatch.setenv("PIPELINE_REGISTRY", str(tmp_path / "from-env"))
    assert open_registry(mirror_mlflow=False).store.root == tmp_path / "from-env"
    explicit = open_registry((tmp_path / "explicit").as_uri(), mirror_mlflow=False)
    assert explicit.store.root == tmp_path / "explicit"
    explicit.publish(lora, "a")
    assert (tmp_path / "explicit" / "adapters" / "a" / "versions" / "1" / "adapter_model.safetensors").is_file()
    with pytest.raises(RegistryError, match="s3"):
        open_registry("s3://bucket/x")


def test_publish_resolve_alias_list(reg, lora, tiny_model_dir):
    v1 = reg.publish(lora, "arith", base_dir=tiny_model_dir, alias="prod", tags={"team": "rl"},
                     lineage={"run_id": "run-1", "mlflow_run_id": "abc", "algorithm": "grpo", "config_digest": "cd",
                              "data_fingerprint": "df", "base_model": "tiny"}, metrics={"reward": 0.5})
    v2 = reg.publish(lora, "arith", parent_version=1)
    assert (v1.version, v2.version) == (1, 2) and v1.ref == "arith@1"
    assert reg.resolve("arith").version == 2
    assert reg.resolve("arith@prod").version == 1
    assert reg.resolve("arith@1").path == v1.path
    md = reg.resolve("arith@1").metadata
    assert md["rank"] == 4 and md["alpha"] == 8.0 and md["target_modules"] == ["q_proj", "v_proj"]
    assert md["lineage"]["algorithm"] == "grpo" and md["metrics"] == {"reward": 0.5} and md["tags"] == {"team": "rl"}
    assert md["base_model"] == "tiny" and md["created"] and md["version"] == 1
    from ground.model_files import fingerprint
    assert v1.base_fingerprint == fingerprint(tiny_model_dir)
    assert reg.get_version("arith", 2).metadata["parent_version"] == 1
    # the stored PEFT files are the published ones, byte for byte
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (v1.path / f).read_bytes() == (lora / f).read_bytes()
    assert reg.list_adapters() == ["arith"]
    assert [v.version for v in reg.list_versions("arith")] == [1, 2]
    reg.set_alias("arith", "prod", 2)
    assert reg.aliases("arith") == {"prod": 2}
    reg.delete_alias("arith", "prod")
    assert reg.aliases("arith") == {}
    assert reg.max_rank() == 4
    assert reg.verify().ok


def test_not_found_lists_what_exists(reg, lora):
    reg.publish(lora, "a", alias="prod")
    with pytest.raises(NotFoundError, match=r"versions of `a`: 1; aliases: prod -> 1"):
        reg.resolve("a@5")
    with pytest.raises(NotFoundError, match=r"aliases: prod -> 1"):
        reg.resolve("a@staging")
    with pytest.raises(NotFoundError, match=r"it holds: a"):
        reg.resolve("b")
    with pytest.raises(NotFoundError):
        reg.set_alias("a", "x", 3)


def test_delete_refused_while_aliased_and_numbers_never_reused(reg, lora):
    for _ in range(3):
        reg.publish(lora, "a")
    reg.set_alias("a", "prod", 3)
    with pytest.raises(RegistryError, match="prod"):
        reg.delete_version("a", 3)
    reg.delete_version("a", 3, force=True)
    assert reg.aliases("a") == {}
    assert reg.resolve("a").version == 2
    assert reg.publish(lora, "a").version == 4  # 3 stays retired: a reference never changes meaning
    reg.delete_version("a", 1)
    assert [v.version for v in reg.list_versions("a")] == [2, 4]
    assert reg.verify().ok


def test_flipped_byte_reported(reg, lora):
    v = reg.publish(lora, "a")
    reg.publish(lora, "a")
    weights = stored_file(reg, v, "adapter_model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    report = reg.verify()
    assert not report.ok and report.checked == ["a@1", "a@2"]
    assert len(report.problems) == 1 and "a@1: adapter_model.safetensors is corrupted" in report.problems[0]
    assert reg.verify("a@2").ok and not reg.verify("a@1").ok
    stored_file(reg, v, "adapter_config.json").unlink()
    assert any("adapter_config.json is missing" in p for p in reg.verify("a@1").problems)


def _store_snapshot(reg):
    if getattr(reg, "test_server", None) is not None:  # what a client of the server can see, and every upload
        from registry.mlflow_layout import EXPERIMENT

        names = reg.list_adapters()
        uploads = sorted(str(p.relative_to(reg.test_server.artifacts)) for p in reg.test_server.artifacts.rglob("*"))
        return names, {n: (reg.store.version_numbers(n), reg.aliases(n)) for n in names}, uploads, EXPERIMENT
    root = reg.store.root
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" not in p.parts and p.name != ".lock")


def _no_work_left(reg) -> bool:
    if getattr(reg, "test_server", None) is not None:
        return not any(reg.store.cache.root.joinpath(".tmp").iterdir())
    return list((reg.store.root / ".tmp").iterdir()) == []


def _bad_adapters(tmp_path, tiny_model_dir):
    """(folder, expected reason) for each kind of adapter the registry must refuse."""
    from safetensors.numpy import save_file
    import numpy as np

    cases = []
    d = write_lora(tmp_path / "no-config")
    (d / "adapter_config.json").unlink()
    cases.append((d, "no adapter_config.json"))
    d = write_lora(tmp_path / "bin-only")
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    cases.append((d, "pickle weights"))
    cases.append((write_lora(tmp_path / "dora", config_overrides={"use_dora": True}), "DoRA"))
    cases.append((write_lora(tmp_path / "dora-tensor", extra_tensors={
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": np.ones(64, np.float32)}), "DoRA"))
    cases.append((write_lora(tmp_path / "mts", config_overrides={"modules_to_save": ["lm_head"]}), "modules_to_save"))
    cases.append((write_lora(tmp_path / "mts-tensor", extra_tensors={
        "base_model.model.lm_head.weight": np.ones((4, 4), np.float32)}), "not a LoRA A/B"))
    cases.append((write_lora(tmp_path / "ia3", config_overrides={"peft_type": "IA3"}), "only LORA"))
    cases.append((write_lora(tmp_path / "rank-mismatch", rank=4, config_overrides={"r": 8}), "disagree"))
    cases.append((write_lora(tmp_path / "untargeted", config_overrides={"target_modules": ["q_proj"]}),
                  "not in target_modules"))
    wide = {"self_attn.q_proj": (128, 128)}
    cases.append((write_lora(tmp_path / "wrong-base", targets=("q_proj",), shapes=wide), "another base"))
    cases.append((write_lora(tmp_path / "wrong-arch", targets=("c_attn",), shapes={"attn.c_attn": (64, 192)}),
                  "does not exist in the base"))
    d = write_lora(tmp_path / "unpaired")
    from safetensors.numpy import load_file
    t = load_file(str(d / "adapter_model.safetensors"))
    t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    save_file(t, str(d / "adapter_model.safetensors"))
    cases.append((d, "not its partner"))
    d = write_lora(tmp_path / "truncated")
    w = d / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    cases.append((d, "tensors need"))
    d = write_lora(tmp_path / "garbage-header")
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 4) + b"nope")
    cases.append((d, "not valid JSON"))
    return cases


def test_bad_adapters_refused_and_registry_unchanged(reg, lora, tmp_path, tiny_model_dir):
    reg.publish(lora, "a", base_dir=tiny_model_dir, alias="prod")
    before = _store_snapshot(reg)
    cases = _bad_adapters(tmp_path / "bad", tiny_model_dir)
    for folder, reason in cases:
        with pytest.raises(RegistryError, match=reason):
            reg.publish(folder, "a", base_dir=tiny_model_dir)
        assert _store_snapshot(reg) == before, folder
        assert _no_work_left(reg)  # nothing half-written left behind either
    for bad_name in ["../evil", "a/b", "..", ".x", "a" * 129]:
        with pytest.raises(RegistryError, match="Invalid adapter name"):
            reg.publish(lora, bad_name)
    with pytest.raises(RegistryError, match="Invalid alias"):
        reg.publish(lora, "a", alias="../prod")
    assert _store_snapshot(reg) == before
    assert reg.verify().ok and reg.resolve("a@prod").version == 1


def test_base_defaults_to_local_base_model_name_or_path(reg, tmp_path, tiny_model_dir):
    d = write_lora(tmp_path / "l", base_model=str(tiny_model_dir))
    assert reg.publish(d, "a").metadata["base_path"] == str(tiny_model_dir.absolute())
    wrong = write_lora(tmp_path / "w", targets=("q_proj",), shapes={"self_attn.q_proj": (128, 128)},
                       base_model=str(tiny_model_dir))
    with pytest.raises(RegistryError, match="another base"):
        reg.publish(wrong, "a")


def test_symlink_escaping_root_refused(lora, tmp_path):
    reg = open_registry(str(tmp_path / "store"), mirror_mlflow=False)
    reg.publish(lora, "a")
    outside = tmp_path / "outside"
    shutil.copytree(reg.store.root / "adapters" / "a", outside)
    (reg.store.root / "adapters" / "b").symlink_to(outside)
    with pytest.raises(RegistryError, match="outside the registry root"):
        reg.resolve("b")


def test_metadata_is_json_and_manifest_covers_files(reg, lora):
    v = reg.publish(lora, "a")
    manifest = json.loads((v.path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"adapter_model.safetensors", "adapter_config.json", "metadata.json"}
