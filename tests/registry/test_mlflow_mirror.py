"""MLflow Model Registry mirroring against a real local MLflow sqlite store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from registry import open_registry
from tests.synthetic_lora import write_lora

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One real MLflow sqlite store per module (creating its schema takes seconds); tests use distinct names."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(scope="module")
def client(mlflow_uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)


def _mlflow_versions(client, name):
    return {int(mv.version): mv for mv in client.search_model_versions(f"name='{name}'")}


def test_versions_tags_run_link_and_aliases_mirrored(tmp_path, mlflow_uri, client):
    run_id = client.create_run(client.create_experiment("train")).info.run_id
    lora = write_lora(tmp_path / "lora", rank=4, alpha=16)
    reg = open_registry(str(tmp_path / "store"), mlflow_tracking_uri=mlflow_uri)
    for i in range(3):
        reg.publish(lora, "arith", alias="prod" if i == 0 else None, tags={"team": "rl"},
                    lineage={"run_id": f"run-{i}", "mlflow_run_id": run_id, "algorithm": "grpo"},
                    metrics={"reward": 0.1 * i})
    mvs = _mlflow_versions(client, "arith")
    assert sorted(mvs) == [1, 2, 3]
    for n, mv in mvs.items():
        assert mv.tags["registry.ref"] == f"arith@{n}"  # same number on both sides
        assert mv.tags["team"] == "rl" and mv.tags["lineage.algorithm"] == "grpo"
        assert mv.tags["lineage.run_id"] == f"run-{n - 1}" and mv.tags["rank"] == "4" and mv.tags["alpha"] == "16.0"
        assert mv.run_id == run_id  # linked to the training run
        assert mv.source == reg.get_version("arith", n).path.as_uri()
    assert client.get_registered_model("arith").aliases == {"prod": 1}

    reg.set_alias("arith", "prod", 3)
    reg.set_alias("arith", "candidate", 2)
    assert client.get_registered_model("arith").aliases == {"prod": 3, "candidate": 2}
    assert int(client.get_model_version_by_alias("arith", "prod").version) == 3
    reg.delete_alias("arith", "candidate")
    assert client.get_registered_model("arith").aliases == {"prod": 3}

    reg.delete_version("arith", 2)
    assert sorted(_mlflow_versions(client, "arith")) == [1, 3]
    assert reg.publish(lora, "arith").version == 4
    assert sorted(_mlflow_versions(client, "arith")) == [1, 3, 4]
    assert _mlflow_versions(client, "arith")[4].tags["registry.ref"] == "arith@4"


def test_mirror_catches_up_in_order(tmp_path, mlflow_uri, client):
    """Versions published while MLflow was not mirrored (down, or the publisher died before mirroring)."""
    lora = write_lora(tmp_path / "lora")
    root = str(tmp_path / "store")
    mirrored = open_registry(root, mlflow_tracking_uri=mlflow_uri)
    plain = open_registry(root, mirror_mlflow=False)
    mirrored.publish(lora, "a")
    plain.publish(lora, "a", alias="prod")          # 2: never mirrored
    plain.publish(lora, "a")                        # 3: deleted before it was ever mirrored
    plain.delete_version("a", 3)
    assert mirrored.publish(lora, "a").version == 4
    mvs = _mlflow_versions(client, "a")
    assert sorted(mvs) == [1, 2, 4]  # 3's number consumed and deleted in MLflow too, so 4 agrees
    assert all(mv.tags["registry.ref"] == f"a@{n}" for n, mv in mvs.items())
    assert client.get_registered_model("a").aliases == {"prod": 2}


def test_unreachable_mlflow_never_fails_a_publish(tmp_path, caplog):
    lora = write_lora(tmp_path / "lora")
    (tmp_path / "not-a-dir").write_text("x")
    reg = open_registry(str(tmp_path / "store"), mlflow_tracking_uri=f"sqlite:///{tmp_path}/not-a-dir/mlflow.db")
    assert reg.publish(lora, "a").version == 1
    assert "MLflow mirror" in caplog.text
    assert reg.verify().ok


PUBLISH_MIRRORED = """
import sys
from registry import open_registry
root, lora, count = sys.argv[1:4]
reg = open_registry(root)  # mirrors because MLFLOW_TRACKING_URI is set
for _ in range(int(count)):
    print(reg.publish(lora, "shared").version, flush=True)
"""


def test_concurrent_publishers_agree_with_mlflow_numbers(tmp_path, mlflow_uri, client):
    lora = write_lora(tmp_path / "lora")
    client.create_registered_model("shared")  # create the sqlite schema once, before the racers start
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": mlflow_uri}
    procs = [subprocess.Popen([sys.executable, "-c", PUBLISH_MIRRORED, str(tmp_path / "store"), str(lora), "4"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    got = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        got += [int(x) for x in out.split()]
    assert sorted(got) == list(range(1, 13))
    mvs = _mlflow_versions(client, "shared")
    assert sorted(mvs) == list(range(1, 13))
    reg = open_registry(str(tmp_path / "store"), mirror_mlflow=False)
    for n, mv in mvs.items():
        assert mv.tags["registry.ref"] == f"shared@{n}"
        assert mv.tags["registry.sha256"]
        assert mv.source == reg.get_version("shared", n).path.as_uri()
