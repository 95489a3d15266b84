"""`pipeline run train-and-publish registry.uri=mlflow+http://...` against a real MLflow tracking server, starting
from a version on that server (`lora_adapter_path: toy-digits@prod`): the tiny model trains two steps (Ray + FSDP2
+ vLLM), the new version is published to the server with the starting reference and the version it pinned in its
lineage, and it resolves and verifies from the server through a fresh cache."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.cli import cli_entry
from pipeline.runner import read_manifest
from registry import open_registry
from tests.synthetic_lora import write_lora
from tests.mlflow_server import wipe
from tests.stages.train.toy_task import toy_overrides

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_train_from_a_server_version_and_publish_back_to_it(mlflow_server, tiny_model_dir, tmp_path, monkeypatch):
    wipe(mlflow_server)
    monkeypatch.setenv("PIPELINE_REGISTRY_CACHE", str(tmp_path / "cache-trainer"))
    reg = open_registry(mlflow_server.uri)
    # rank 4 on q_proj/v_proj only, unlike the run's own LoRA settings (rank 8, lm_head too): what gets published
    # shows whether training really started from this adapter
    start = write_lora(tmp_path / "start", rank=4, alpha=8.0, seed=3, base_model=str(tiny_model_dir))
    reg.publish(start, "toy-digits", base_dir=tiny_model_dir, alias="prod")

    run_dir = tmp_path / "runs" / "from-server"
    overrides = toy_overrides(tiny_model_dir, tmp_path, steps=2, extra={
        "registry.uri": mlflow_server.uri,
        "actor_rollout_ref.model.lora_adapter_path": "toy-digits@prod",
        "publish.name": "toy-digits",
        "publish.alias": "candidate",
        "publish.force": True,  # two steps need not beat the start; this test is about where it starts and ends
        "trainer.cpu_workers": 1,
    })
    assert cli_entry(["run", "train-and-publish", "--run-dir", str(run_dir), *overrides]) == 0

    m = read_manifest(run_dir)
    out = {s["name"]: s["outputs"] for s in m["stages"]}
    started = out["train"]["start_adapter"]
    assert (started["reference"], started["ref"], started["registry"]) == ("toy-digits@prod", "toy-digits@1",
                                                                           mlflow_server.uri)
    assert "toy-digits@prod (= toy-digits@1" in out["evaluate"]["start_point"]
    assert out["publish"]["ref"] == "toy-digits@2" and out["publish"]["registry"] == mlflow_server.uri
    # the run's saved config keeps the reference, not this machine's cache folder
    assert "lora_adapter_path: toy-digits@prod" in (run_dir / "config.yaml").read_text()

    # another machine's view: a fresh cache, everything from the server
    monkeypatch.setenv("PIPELINE_REGISTRY_CACHE", str(tmp_path / "cache-reader"))
    reader = open_registry(mlflow_server.uri)
    assert reader.aliases("toy-digits") == {"prod": 1, "candidate": 2}
    version = reader.resolve("toy-digits@candidate")
    assert version.version == 2 and str(tmp_path / "cache-reader") in str(version.path)
    assert reader.verify("toy-digits@2").ok
    lineage = version.metadata["lineage"]
    assert lineage["run_id"] == "from-server" and lineage["steps"] == 2
    assert lineage["start_adapter"]["reference"] == "toy-digits@prod"
    assert lineage["start_adapter"]["ref"] == "toy-digits@1"
    assert lineage["start_adapter"]["weights_sha256"] == json.loads(
        (reader.resolve("toy-digits@1").path / "manifest.json").read_text())["files"]["adapter_model.safetensors"]["sha256"]
    assert version.metadata["parent_version"] == 1
    config = json.loads((Path(version.path) / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]  # the start's shape
    assert (Path(version.path) / "adapter_model.safetensors").read_bytes() != \
        (start / "adapter_model.safetensors").read_bytes()  # and two steps moved it


def test_pipeline_train_starts_from_a_local_registry_reference(tiny_model_dir, tmp_path, capsys):
    """`pipeline train` (no pipeline run) with a file:// registry and `NAME` (its latest version)."""
    store = tmp_path / "registry"
    reg = open_registry(store.as_uri(), mirror_mlflow=False)
    start = write_lora(tmp_path / "start", rank=4, alpha=8.0, seed=5, base_model=str(tiny_model_dir))
    reg.publish(start, "warm-start", base_dir=tiny_model_dir)
    reg.publish(write_lora(tmp_path / "newer", rank=4, alpha=8.0, seed=6), "warm-start", base_dir=tiny_model_dir)
    out_dir = tmp_path / "out"
    overrides = toy_overrides(tiny_model_dir, tmp_path, steps=1, extra={
        "registry.uri": store.as_uri(),
        "actor_rollout_ref.model.lora_adapter_path": "warm-start",
        "trainer.cpu_workers": 1,
        "trainer.val_before_train": False,
    })
    assert cli_entry(["train", "--out-dir", str(out_dir), *overrides]) == 0
    printed = capsys.readouterr().out
    assert f"start adapter: warm-start = warm-start@2 from {store.as_uri()}" in printed, printed
    adapter = Path(re.search(r"^adapter: (.+)$", printed, re.M).group(1))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert reg.verify().ok  # training read the version folder and left it as published
