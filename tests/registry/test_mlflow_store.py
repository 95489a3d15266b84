"""The MLflow store's own behaviour against a real `mlflow server`: every CLI command, copy local -> server ->
local, damaged files never handed out, the verified cache (shared, cleaned by size), an unreachable server."""

from __future__ import annotations

import json
import threading

import pytest

from pipeline.cli import cli_entry
from ground.errors import RegistryError
from registry import open_registry
from tests.synthetic_lora import write_lora
from tests.mlflow_server import free_port
from tests.registry.conftest import stored_file


def run(capsys, *args) -> tuple[int, str, str]:
    code = cli_entry(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_every_cli_command_against_the_server(mlflow_reg, capsys, tmp_path, tiny_model_dir):
    uri = mlflow_reg.uri
    lora = write_lora(tmp_path / "lora", rank=4, alpha=8)
    code, out, err = run(capsys, "registry", "--registry", uri, "publish", str(lora), "--name", "arith", "--base",
                         str(tiny_model_dir), "--alias", "prod", "--tag", "team=rl")
    assert code == 0 and "published arith@1 (alias prod)" in out, err
    assert run(capsys, "registry", "--registry", uri, "import", str(lora), "--name", "arith")[0] == 0
    code, out, _ = run(capsys, "registry", "--registry", uri, "list", "--json")
    assert json.loads(out) == [{"name": "arith", "versions": 2, "latest": 2, "aliases": {"prod": 1}}]
    code, out, _ = run(capsys, "registry", "--registry", uri, "list", "arith")
    assert code == 0 and out.count("\n") == 3 and "prod" in out
    code, out, _ = run(capsys, "registry", "--registry", uri, "show", "arith@prod", "--json")
    shown = json.loads(out)
    assert shown["ref"] == "arith@1" and shown["metadata"]["version"] == 1 and shown["metadata"]["tags"] == {"team": "rl"}
    assert shown["metadata"]["base_fingerprint"] and set(shown["files"]) == {
        "adapter_model.safetensors", "adapter_config.json", "metadata.json"}
    assert run(capsys, "registry", "--registry", uri, "alias", "set", "arith", "prod", "2")[0] == 0
    assert run(capsys, "registry", "--registry", uri, "alias", "set", "arith", "old", "1")[0] == 0
    code, _, err = run(capsys, "registry", "--registry", uri, "delete", "arith@2")
    assert code == 2 and "prod" in err and "--force" in err
    assert run(capsys, "registry", "--registry", uri, "alias", "delete", "arith", "old")[0] == 0
    assert run(capsys, "registry", "--registry", uri, "delete", "arith@1")[0] == 0
    code, out, _ = run(capsys, "registry", "--registry", uri, "verify")
    assert code == 0 and "checked 1 version" in out
    assert run(capsys, "registry", "--registry", uri, "export", "arith", "--out", str(tmp_path / "out"))[0] == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == (lora / "adapter_model.safetensors").read_bytes()
    code, out, err = run(capsys, "registry", "--registry", uri, "export", "arith@prod", "--out", str(tmp_path / "merged"),
                         "--merge", "--base", str(tiny_model_dir))
    assert code == 0 and (tmp_path / "merged" / "model.safetensors").is_file(), err
    code, _, err = run(capsys, "registry", "--registry", uri, "show", "arith@1")
    assert code == 2 and "versions of `arith`: 2" in err  # 1 was deleted; its number stays retired
    assert run(capsys, "registry", "--registry", uri, "publish", str(lora), "--name", "arith")[1].startswith(
        "published arith@3")
    code, out, _ = run(capsys, "registry", "--registry", uri, "cleanup")
    # the server is shared with test_mlflow_concurrency.py, whose SIGKILLed publishers may leave an upload that
    # cleanup must leave alone for its first 120 s (the dead writer's version may still appear); nothing else
    reported = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert code == 0 and all("crashy" in r and "left for a cleanup once" in r for r in reported), out
    assert f"{len(reported)} leftover(s)" in out
    code, _, err = run(capsys, "registry", "--registry", uri, "push", "arith", "--hub", "../x")
    assert code == 2 and "Invalid Hugging Face repo id" in err
    code, _, err = run(capsys, "registry", "--registry", "mlflow://127.0.0.1:5000", "list")
    assert code == 2 and "mlflow+http://HOST:PORT" in err


def test_copy_local_to_server_and_back(mlflow_reg, capsys, tmp_path, tiny_model_dir):
    lora_a, lora_b = write_lora(tmp_path / "a", rank=4, seed=1), write_lora(tmp_path / "b", rank=8, seed=2)
    local = open_registry(str(tmp_path / "local"), mirror_mlflow=False)
    local.publish(lora_a, "x", base_dir=tiny_model_dir, lineage={"run_id": "r1", "algorithm": "grpo"},
                  metrics={"reward": 0.5})
    local.publish(lora_b, "x", alias="prod")
    local.publish(lora_a, "x")
    local.delete_version("x", 2, force=True)  # a gap: 1, 3 (2 retired)
    local.set_alias("x", "prod", 3)
    local.publish(lora_b, "y", alias="candidate")
    local.set_route("x", {"prod": 90, "1": 10}, reason="canary of the old one")
    source_events = {e.to_json() for e in local.history("x")}

    code, out, err = run(capsys, "registry", "copy", local.uri, mlflow_reg.uri)
    assert code == 0 and "copied 3 version(s)" in out, err
    assert f"route prod=90 1=10; {len(source_events)} history event(s) added" in out
    back = open_registry(str(tmp_path / "back"), mirror_mlflow=False)
    assert run(capsys, "registry", "copy", mlflow_reg.uri, str(tmp_path / "back"), "x")[0] == 0
    for reg in (mlflow_reg, back):
        assert [v.version for v in reg.list_versions("x")] == [1, 3]
        assert reg.aliases("x") == {"prod": 3}
        assert reg.get_route("x").weights == {"prod": 90, "1": 10}  # bare `x` picks the same versions there
        assert source_events <= {e.to_json() for e in reg.history("x")}  # who moved what, when and why, kept
        v1 = reg.resolve("x@1")
        assert v1.lineage == {"run_id": "r1", "algorithm": "grpo"} and v1.metadata["metrics"] == {"reward": 0.5}
        assert v1.base_fingerprint == local.resolve("x@1").base_fingerprint
        assert v1.metadata["created"] == local.resolve("x@1").metadata["created"]
        for v in (1, 3):
            for f in ("adapter_model.safetensors", "adapter_config.json"):
                assert (reg.resolve(f"x@{v}").path / f).read_bytes() == (local.resolve(f"x@{v}").path / f).read_bytes()
        assert reg.verify().ok
    assert back.publish(lora_a, "x").version == 4  # the copy keeps numbers retired too
    assert mlflow_reg.publish(lora_b, "x").version == 4
    assert mlflow_reg.aliases("y") == {"candidate": 1} and back.list_adapters() == ["x"]
    code, out, _ = run(capsys, "registry", "copy", local.uri, mlflow_reg.uri, "y")  # again: nothing to do
    assert code == 0 and "copied 0 version(s)" in out
    local.clear_route("x")
    code, out, _ = run(capsys, "registry", "copy", local.uri, str(tmp_path / "back"), "x")
    assert code == 0 and "no route; 1 history event(s) added" in out  # the clear itself is the one new event
    cleared = back.get_route("x")
    assert cleared is None or not cleared.targets
    code, _, err = run(capsys, "registry", "copy", str(tmp_path / "back"), mlflow_reg.uri, "x")
    assert code == 2 and "different x@4" in err  # same number, other files: refused


def test_damaged_files_on_the_server_are_never_handed_out(mlflow_reg, tmp_path):
    lora = write_lora(tmp_path / "lora")
    v = mlflow_reg.publish(lora, "a")
    weights = stored_file(mlflow_reg, v, "adapter_model.safetensors")
    data = bytearray(weights.read_bytes())
    data[100] ^= 0x01
    weights.write_bytes(bytes(data))
    elsewhere = open_registry(mlflow_reg.uri, cache_dir=tmp_path / "other-machine")  # its cache is empty
    av = elsewhere.resolve("a@1")  # metadata comes from the version's tags: no download yet
    with pytest.raises(RegistryError, match="does not match its manifest"):
        av.path  # noqa: B018
    assert not list((tmp_path / "other-machine").glob("*/versions/a/*"))  # nothing half-verified kept
    assert not list((tmp_path / "other-machine").glob("*/.tmp/*"))
    # a flipped byte in a machine's cached copy: verify reports it and drops the copy, the next read re-downloads
    weights.write_bytes(bytes(data[:100]) + bytes([data[100] ^ 0x01]) + bytes(data[101:]))  # repaired on the server
    good = elsewhere.resolve("a@1").path
    cached = good / "adapter_model.safetensors"
    cached.write_bytes(cached.read_bytes()[:-1] + bytes([cached.read_bytes()[-1] ^ 0xFF]))
    report = elsewhere.verify("a@1")
    assert not report.ok and "cached copy" in report.problems[0] and not good.exists()
    assert (elsewhere.resolve("a@1").path / "adapter_model.safetensors").read_bytes() == \
        (lora / "adapter_model.safetensors").read_bytes()


def test_cache_is_shared_by_threads_and_cleaned_by_size(mlflow_reg, tmp_path):
    loras = [write_lora(tmp_path / f"l{i}", rank=16, seed=i) for i in range(4)]
    for lora in loras:
        mlflow_reg.publish(lora, "c")
    size = sum(f.stat().st_size for f in loras[0].iterdir()) + 2000
    reader = open_registry(mlflow_reg.uri, cache_dir=tmp_path / "cache", cache_bytes=int(size * 2.5))
    reader.store.cache.min_idle_s = 0.0
    paths, errors = [], []

    def read(v):
        try:
            paths.append(reader.resolve(f"c@{v}").path)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(1,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1  # six concurrent readers, one download, one folder
    for v in (2, 3, 4):
        reader.resolve(f"c@{v}").path  # noqa: B018
    kept = sorted(int(p.name.split("-")[0]) for p in reader.store.cache.root.glob("versions/c/*"))
    assert kept == [3, 4], kept  # least recently used went first; the cache stays under its cap
    assert sum(s for _, s, _ in reader.store.cache.entries()) <= reader.store.cache.max_bytes
    assert reader.resolve("c@1").path.is_dir()  # evicted versions come back on use


def test_unreachable_server_is_one_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_REGISTRY_CACHE", str(tmp_path / "cache"))
    uri = f"mlflow+http://127.0.0.1:{free_port()}"
    code, _, err = run(capsys, "registry", "--registry", uri, "list")
    assert code == 2 and "is unreachable" in err and uri.replace("mlflow+", "") in err and "Traceback" not in err
    code, _, err = run(capsys, "registry", "--registry", "mlflow+http://user:secret@127.0.0.1:5000", "list")
    assert code == 2 and "MLFLOW_TRACKING_USERNAME" in err and "secret" not in err
