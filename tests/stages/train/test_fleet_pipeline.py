"""`pipeline run train-fleet -c fleet.yaml` on the tiny model: stage, train three members in one run (one
step), publish each finished member as NAME@V with lineage to the shared run; the member with a raising reward
fails alone and is listed with its error in the manifest. Real Ray, vLLM CPU engine, FSDP2, local registry."""

from __future__ import annotations

import pytest
import yaml

from pipeline.cli import cli_entry
from pipeline.runner import read_manifest
from tests.stages.train.fleet_helpers import write_fleet

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_train_fleet_publishes_each_finished_member_with_lineage_to_the_shared_run(tiny_model_dir, tmp_path):
    from registry import open_registry

    path = write_fleet(tiny_model_dir, tmp_path, steps=1)
    doc = yaml.safe_load(path.read_text())
    doc["fleet"]["members"] = [m for m in doc["fleet"]["members"] if m["name"] in ("add", "sub", "broken")]
    path.write_text(yaml.safe_dump(doc))
    store = tmp_path / "registry"
    run_dir = tmp_path / "runs" / "fleet-e2e"
    assert cli_entry(["run", "train-fleet", "-c", str(path), "--run-dir", str(run_dir),
                      f"registry.uri={store}", "publish.alias=candidate"]) == 0

    manifest = read_manifest(run_dir)
    assert manifest["status"] == "succeeded"
    assert [s["name"] for s in manifest["stages"]] == ["stage_model", "train_fleet", "publish_fleet"]
    members = {s["name"]: s for s in manifest["stages"]}["publish_fleet"]["outputs"]["members"]
    assert {n: m["status"] for n, m in members.items()} == {"add": "published", "sub": "published",
                                                            "broken": "failed"}
    assert members["broken"]["error"]["type"] == "RewardError" and members["broken"]["ref"] is None

    reg = open_registry(str(store), mirror_mlflow=False)
    assert sorted(reg.list_adapters()) == ["add", "sub"]
    lineages = {}
    for name in ("add", "sub"):
        version = reg.resolve(f"{name}@candidate")
        assert version.ref == members[name]["ref"] == f"{name}@1"
        lineage = version.metadata["lineage"]
        assert lineage["run_id"] == "fleet-e2e"
        assert lineage["fleet"]["run"] == "fleet-e2e" and lineage["fleet"]["members"] == ["add", "sub", "broken"]
        assert lineage["fleet"]["member"] == name
        lineages[name] = lineage
        # its held-out reward before (the base) and after training, from the fleet's validation
        assert set(version.metadata["metrics"]) >= {"start_reward", "adapter_reward", "improvement"}
    assert lineages["add"]["config_digest"] != lineages["sub"]["config_digest"]  # each its own config (rank, lr, n)
    assert (run_dir / "fleet.yaml").is_file()
