"""`pipeline registry ...` on real folders: in-process through cli_entry, and as a real `pipeline` process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import cli_entry
from registry import open_registry
from tests.synthetic_lora import write_lora

PIPELINE = str(Path(sys.executable).parent / "pipeline")


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return str(tmp_path / "store")


def run(capsys, *args) -> tuple[int, str, str]:
    code = cli_entry(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_publish_list_show_alias_delete(capsys, store, tmp_path, tiny_model_dir):
    lora = write_lora(tmp_path / "lora", rank=4, alpha=8)
    code, out, err = run(capsys, "registry", "--registry", store, "publish", str(lora), "--name", "arith",
                         "--base", str(tiny_model_dir), "--alias", "prod", "--tag", "team=rl", "--tag", "x=1=2")
    assert code == 0, err
    assert "published arith@1 (alias prod)" in out
    assert run(capsys, "registry", "--registry", store, "publish", str(lora), "--name", "arith")[0] == 0

    code, out, _ = run(capsys, "registry", "--registry", store, "list", "--json")
    assert json.loads(out) == [{"name": "arith", "versions": 2, "latest": 2, "aliases": {"prod": 1}}]
    code, out, _ = run(capsys, "registry", "--registry", store, "list", "arith")
    assert code == 0 and "prod" in out and out.count("\n") == 3
    code, out, _ = run(capsys, "registry", "--registry", store, "show", "arith@prod", "--json")
    shown = json.loads(out)
    assert shown["ref"] == "arith@1" and shown["aliases"] == ["prod"]
    assert shown["metadata"]["tags"] == {"team": "rl", "x": "1=2"} and shown["metadata"]["base_fingerprint"]
    assert set(shown["files"]) == {"adapter_model.safetensors", "adapter_config.json", "metadata.json"}
    code, out, _ = run(capsys, "registry", "--registry", store, "show", "arith")
    assert code == 0 and out.startswith("arith@2") and "sha256:" in out

    assert run(capsys, "registry", "--registry", store, "alias", "set", "arith", "prod", "2")[0] == 0
    code, _, err = run(capsys, "registry", "--registry", store, "delete", "arith@2")
    assert code == 2 and "prod" in err and "--force" in err
    assert run(capsys, "registry", "--registry", store, "delete", "arith@1")[0] == 0
    assert run(capsys, "registry", "--registry", store, "alias", "delete", "arith", "prod")[0] == 0
    assert open_registry(store, mirror_mlflow=False).aliases("arith") == {}
    code, _, err = run(capsys, "registry", "--registry", store, "show", "arith@9")
    assert code == 2 and "versions of `arith`: 2" in err and "Traceback" not in err
    code, _, err = run(capsys, "registry", "--registry", store, "publish", str(lora), "--name", "../up")
    assert code == 2 and "Invalid adapter name" in err


def test_env_and_config_pick_the_store(capsys, store, tmp_path, monkeypatch):
    lora = write_lora(tmp_path / "lora")
    monkeypatch.setenv("PIPELINE_REGISTRY", store)
    assert run(capsys, "registry", "publish", str(lora), "--name", "a")[0] == 0
    assert open_registry(store, mirror_mlflow=False).resolve("a").version == 1
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"registry:\n  uri: {tmp_path / 'from-config'}\n")
    assert run(capsys, "registry", "-c", str(cfg), "publish", str(lora), "--name", "b")[0] == 0
    assert open_registry(str(tmp_path / "from-config"), mirror_mlflow=False).list_adapters() == ["b"]


def test_verify_exit_code_as_a_real_process(store, tmp_path):
    lora = write_lora(tmp_path / "lora")
    reg = open_registry(store, mirror_mlflow=False)
    v = reg.publish(lora, "a")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    ok = subprocess.run([PIPELINE, "registry", "--registry", store, "verify"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "all files match" in ok.stdout
    weights = v.path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    bad = subprocess.run([PIPELINE, "registry", "--registry", store, "verify", "a@1"], capture_output=True, text=True,
                         env=env)
    assert bad.returncode != 0
    assert "a@1: adapter_model.safetensors is corrupted" in bad.stdout and "1 problem" in bad.stderr


def test_import_and_export(capsys, store, tmp_path):
    lora = write_lora(tmp_path / "lora", rank=8, alpha=16)
    code, out, err = run(capsys, "registry", "--registry", store, "import", str(lora), "--name", "imp")
    assert code == 0, err
    av = open_registry(store, mirror_mlflow=False).resolve("imp")
    assert av.lineage["imported_from"] == str(lora.absolute())
    assert run(capsys, "registry", "--registry", store, "export", "imp@1", "--out", str(tmp_path / "out"))[0] == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == (lora / "adapter_model.safetensors").read_bytes()
    bin_only = write_lora(tmp_path / "bin")
    (bin_only / "adapter_model.safetensors").rename(bin_only / "adapter_model.bin")
    code, _, err = run(capsys, "registry", "--registry", store, "import", str(bin_only), "--name", "imp")
    assert code == 2 and "never unpickles" in err
    code, _, err = run(capsys, "registry", "--registry", store, "export", "imp", "--out", str(tmp_path / "m"), "--merge")
    assert code == 2 and "--base PATH" in err  # published without a base: say how to merge


def test_export_never_writes_over_an_existing_path(capsys, store, tmp_path):
    lora = write_lora(tmp_path / "lora")
    assert run(capsys, "registry", "--registry", store, "publish", str(lora), "--name", "ex")[0] == 0
    a_file = tmp_path / "a-file"
    a_file.write_bytes(b"mine")
    full = tmp_path / "full"
    full.mkdir()
    (full / "adapter_config.json").write_text("{}")  # a user's folder that happens to hold the same file name
    for target in (a_file, full):
        code, _, err = run(capsys, "registry", "--registry", store, "export", "ex@1", "--out", str(target))
        assert code == 2 and "already exists" in err
    assert a_file.read_bytes() == b"mine"
    assert [p.name for p in full.iterdir()] == ["adapter_config.json"] and (full / "adapter_config.json").read_text() == "{}"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial export left beside them


def test_a_folder_that_is_not_a_registry_is_not_written_into(capsys, tmp_path):
    lora = write_lora(tmp_path / "lora")
    mine = tmp_path / "my-folder"
    (mine / ".tmp").mkdir(parents=True)
    (mine / ".tmp" / "a-b-1-c").write_text("mine")  # a name the registry's own cleanup would judge
    (mine / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "registry", "--registry", str(mine), "publish", str(lora), "--name", "x")
    assert code == 2 and "is not a registry" in err and "new or empty folder" in err
    assert sorted(str(p.relative_to(mine)) for p in mine.rglob("*")) == [".tmp", ".tmp/a-b-1-c", "notes.txt"]
    assert (mine / ".tmp" / "a-b-1-c").read_text() == "mine"


def test_hub_up_to_the_network_boundary(capsys, store, tmp_path):
    """No network here: offline mode and an unreachable endpoint both end in a RegistryError saying what to do."""
    lora = write_lora(tmp_path / "lora")
    open_registry(store, mirror_mlflow=False).publish(lora, "a")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([PIPELINE, "registry", "--registry", store, "push", "a", "--hub", "me/arith"],
                       capture_output=True, text=True, env=offline)
    assert r.returncode == 2 and "HF_HUB_OFFLINE=1" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([PIPELINE, "registry", "--registry", store, "import", "me/arith", "--name", "b"],
                       capture_output=True, text=True, env=offline)
    assert r.returncode == 2 and "import LOCAL_DIR" in r.stderr
    # online mode against an endpoint nobody listens on: huggingface_hub really tries HTTP and we report it
    unreachable = {**env, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_test"}
    r = subprocess.run([PIPELINE, "registry", "--registry", store, "push", "a@1", "--hub", "me/arith"],
                       capture_output=True, text=True, env=unreachable, timeout=60)
    assert r.returncode == 2 and "Pushing a@1 to the Hub repo `me/arith` failed" in r.stderr
    code, _, err = run(capsys, "registry", "--registry", store, "push", "a", "--hub", "../x")
    assert code == 2 and "Invalid Hugging Face repo id" in err
    assert open_registry(store, mirror_mlflow=False).list_adapters() == ["a"]
