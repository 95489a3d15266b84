"""The whole `train-and-publish` pipeline on the tiny model with real stages: Ray + FSDP2 workers, vLLM
rollouts, MLflow, the registry and the multi-adapter server.

- a full run ends with one published registry version (with lineage), a served answer, nested MLflow runs and
  a report;
- a run SIGKILLed during training resumes with `--resume` and ends with exactly one published version.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import cli_entry
from pipeline.runner import read_manifest
from tests.stages.train.toy_task import toy_overrides

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(tiny_model_dir, tmp_path, steps, extra=None):
    base = {
        "registry.uri": str(tmp_path / "registry"),
        "publish.name": "toy-digits",
        "publish.alias": "prod",
        "trainer.cpu_workers": 1,
        "trainer.test_freq": -1,
    }
    base.update(extra or {})
    return toy_overrides(tiny_model_dir, tmp_path, steps=steps, extra=base)


def test_train_and_publish_end_to_end_with_serving(tiny_model_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    from registry import open_registry

    run_dir = tmp_path / "runs" / "e2e"
    args = ["run", "train-and-publish", "--run-dir", str(run_dir),
            *_overrides(tiny_model_dir, tmp_path, steps=6, extra={
                "serve.enable": True, "serve.port": _free_port(), "serve.gpu_memory_utilization": 0.1,
                "serve.api_key": "test-key"})]
    assert cli_entry(args) == 0

    m = read_manifest(run_dir)
    assert m["status"] == "succeeded"
    assert [s["name"] for s in m["stages"]] == ["stage_model", "train", "evaluate", "publish", "serve"]
    assert all(s["status"] == "succeeded" for s in m["stages"])
    out = {s["name"]: s["outputs"] for s in m["stages"]}

    # the gate: published because the adapter beat the base on held-out prompts
    ev = out["evaluate"]
    assert ev["publish"] and ev["adapter_reward"] > ev["base_reward"], ev

    # the registry version, with lineage back to this run and its MLflow training run
    reg = open_registry(str(tmp_path / "registry"))
    version = reg.resolve("toy-digits@prod")
    assert version.ref == out["publish"]["ref"] == "toy-digits@1"
    assert version.base_fingerprint == out["stage_model"]["fingerprint"]
    lineage = version.metadata["lineage"]
    assert lineage["run_id"] == "e2e" and lineage["mlflow_run_id"] == out["train"]["mlflow_run_id"]
    assert lineage["data_fingerprint"] == out["train"]["data_fingerprint"]
    assert version.metadata["metrics"]["adapter_reward"] == pytest.approx(ev["adapter_reward"])
    assert reg.verify("toy-digits@1").ok

    # served: the published version answered one request through the endpoint
    assert out["serve"]["served"] and out["serve"]["model"] == "toy-digits@1"
    assert isinstance(out["serve"]["answer"], str)

    # MLflow: one parent run, a nested run per stage (training's own run included)
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    parent = client.get_run(m["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["adapter_reward"] == pytest.approx(ev["adapter_reward"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.info.run_id for c in children} >= {out["train"]["mlflow_run_id"]} | {
        s["mlflow_run_id"] for s in m["stages"] if s["name"] != "train"}
    assert len(children) == 5

    # the report: curves as pictures, before/after, the published reference
    report = (run_dir / "report.md").read_text()
    assert "`toy-digits@1`" in report and "| adapter |" in report
    assert (run_dir / "reward_curve.png").is_file() and (run_dir / "validation_curve.png").is_file()
    assert cli_entry(["runs", "show", str(run_dir)]) == 0


def _kill_tree(proc: subprocess.Popen) -> None:
    import psutil

    try:
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def test_killed_during_training_resumes_and_publishes_once(tiny_model_dir, tmp_path):
    from registry import open_registry

    run_dir = tmp_path / "runs" / "killed"
    steps = 6
    overrides = _overrides(tiny_model_dir, tmp_path, steps=steps, extra={"trainer.save_freq": 2})
    proc = subprocess.Popen(
        [sys.executable, "-c", "from pipeline.cli import main_entry; main_entry()", "run", "train-and-publish",
         "--run-dir", str(run_dir), *overrides],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    pointer = run_dir / "train" / "checkpoints" / "latest_checkpointed_iteration.txt"
    try:
        deadline = time.monotonic() + 600
        while not pointer.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert pointer.exists(), "no checkpoint was written before the deadline"
    finally:
        _kill_tree(proc)

    m = read_manifest(run_dir)
    train_entry = next(s for s in m["stages"] if s["name"] == "train")
    assert train_entry["status"] == "running"  # killed mid-stage: the manifest says so
    killed_at = int(pointer.read_text())
    assert killed_at < steps

    assert cli_entry(["run", "train-and-publish", "--resume", str(run_dir)]) == 0
    m = read_manifest(run_dir)
    assert m["status"] == "succeeded" and len(m["attempts"]) == 2
    out = {s["name"]: s.get("outputs") for s in m["stages"]}
    assert out["train"]["steps"] == steps
    history = [json.loads(line) for line in Path(out["train"]["history_path"]).read_text().splitlines() if line]
    assert [h["step"] for h in history if "reward/mean" in h] == list(range(1, steps + 1))

    reg = open_registry(str(tmp_path / "registry"))
    if out["evaluate"]["publish"]:
        assert [v.version for v in reg.list_versions("toy-digits")] == [1]
    else:
        assert "toy-digits" not in reg.list_adapters()
