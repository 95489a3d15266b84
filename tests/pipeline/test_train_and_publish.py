"""The whole `train-and-publish` pipeline on the tiny model with real stages: Ray + FSDP2 workers, vLLM
rollouts, MLflow, the registry and the multi-adapter server.

- a seeded GRPO run on the toy task (tests/stages/train/toy_task.py) raises the greedy validation reward by more
  than 0.3 (12 steps: the toy's greedy reward jumps from ~0.01 to 0.67 between steps 4 and 8 on every seed tried,
  so the last 4 steps are margin for a machine whose float rounding takes another trajectory) and ends with one
  published registry version (with lineage), a served answer, nested MLflow runs (the training run with every config key, per-step metrics and the adapter artifact) and a report;
- an RLOO run SIGKILLed (whole process tree) after a training checkpoint resumes with `--resume`: the same final
  step, the optimizer / LR schedule / data position continued, the adapter moved from the checkpointed one only
  as far as the remaining steps can move it, and exactly one published version.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ground.ports import free_port
from pipeline.cli import cli_entry
from pipeline.runner import read_manifest
from tests.stages.train.toy_task import toy_overrides

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


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


def test_train_and_publish_end_to_end_with_serving(tiny_model_dir, tmp_path, capfd):
    from mlflow.tracking import MlflowClient

    from registry import open_registry

    run_dir = tmp_path / "runs" / "e2e"
    args = ["run", "train-and-publish", "--run-dir", str(run_dir),
            *_overrides(tiny_model_dir, tmp_path, steps=12, extra={
                "trainer.cpu_workers": 2, "trainer.test_freq": 4, "trainer.save_freq": 4,
                "serve.enable": True, "serve.port": free_port(), "serve.kv_cache_gib": 0.1,
                "serve.api_key": "test-key"})]
    assert cli_entry(args) == 0

    # a readable console: stage lines, progress, validation and the summary; Ray, vLLM and our INFO lines go
    # to the run's log file, written by every process of the run (driver, actor ranks, rollout engine)
    console = capfd.readouterr()
    lines = [ln for ln in (console.out + console.err).replace("\r", "\n").splitlines() if ln.strip()]
    bar_free = [ln for ln in lines if not re.search(r"\d+/\d+ \[", ln)]  # each redraw of a tqdm bar is a line
    assert any(ln.startswith("stage train: started") for ln in lines), lines
    assert any(ln.startswith("validation at step 12:") for ln in lines), lines
    assert len(bar_free) <= 60, "\n".join(bar_free)
    assert not [ln for ln in lines if " INFO " in ln or "(RolloutEngine" in ln or "(ActorWorker" in ln], lines
    log_text = (run_dir / "pipeline.log").read_text()
    assert "[rollout]" in log_text and "[rank 0]" in log_text and "[rank 1]" in log_text
    assert "INFO stages.stage_model: Base model" in log_text

    m = read_manifest(run_dir)
    assert m["status"] == "succeeded"
    assert [s["name"] for s in m["stages"]] == ["stage_model", "train", "evaluate", "publish", "serve"]
    assert all(s["status"] == "succeeded" for s in m["stages"])
    out = {s["name"]: s["outputs"] for s in m["stages"]}

    # the gate: published because the adapter beat the base on held-out prompts
    ev = out["evaluate"]
    # the base's greedy responses hold ~2% digits; the trained policy's far more
    assert ev["publish"] and ev["start_reward"] < 0.1 and ev["adapter_reward"] - ev["start_reward"] > 0.3, ev
    train = out["train"]
    history = [json.loads(line) for line in Path(train["history_path"]).read_text().splitlines() if line]
    steps = [h for h in history if "reward/mean" in h]
    assert [h["step"] for h in steps] == list(range(1, 13))
    assert [h["step"] for h in history if "val/reward" in h] == [0, 4, 8, 12]
    for key in ("reward/std", "reward/acc", "response_length/mean", "actor/entropy", "actor/pg_clipfrac",
                "actor/grad_norm", "actor/lr", "timing/generate", "timing/update", "timing/sync",
                "perf/tokens_per_s", "sync/bytes"):
        assert all(math.isfinite(h[key]) for h in steps), key
    assert set(train["phase_seconds"]) >= {"generate", "reference", "old_log_prob", "update", "sync"}
    adapter_cfg = json.loads((Path(train["adapter_dir"]) / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and adapter_cfg["lora_alpha"] == 16  # lora_alpha preserved
    assert (Path(train["checkpoint_dir"]) / "global_step_4" / "adapter" / "adapter_model.safetensors").is_file()

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
    run = client.get_run(train["mlflow_run_id"])  # the training run: params, per-step metrics, the adapter
    assert run.info.status == "FINISHED" and len(run.data.params) > 100
    assert run.data.params["actor_rollout_ref.model.lora_rank"] == "8"
    assert len(client.get_metric_history(run.info.run_id, "reward/mean")) == 12
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/reward")] == [0, 4, 8, 12]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= artifacts

    # the report: curves as pictures, before/after, the published reference
    report = (run_dir / "report.md").read_text()
    assert "`toy-digits@1`" in report and "| adapter |" in report
    assert (run_dir / "reward_curve.png").is_file() and (run_dir / "validation_curve.png").is_file()
    assert cli_entry(["runs", "show", str(run_dir)]) == 0


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the run and every process it started, then remove the /dev/shm segments its vLLM engine had
    mapped: a killed engine cannot, and each holds hundreds of MB of RAM."""
    import psutil

    from ground.processes import shm_segments_of

    try:
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    segments = shm_segments_of(family)
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    for path in segments:
        Path(path).unlink(missing_ok=True)


STEPS, SAVE_FREQ, LR, WARMUP = 6, 2, 1e-2, 6


def test_killed_during_training_resumes_and_publishes_once(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from registry import open_registry

    run_dir = tmp_path / "runs" / "killed"
    overrides = _overrides(tiny_model_dir, tmp_path, steps=STEPS, extra={
        "algorithm.adv_estimator": "rloo",
        "actor_rollout_ref.actor.optim.lr": LR,
        "actor_rollout_ref.actor.optim.lr_warmup_steps": WARMUP,
        "actor_rollout_ref.actor.optim.weight_decay": 0.0,
        "trainer.save_freq": SAVE_FREQ,
        "publish.force": True,  # this test is about resuming; the gate has its own test
    })
    proc = subprocess.Popen(
        [sys.executable, "-c", "from pipeline.cli import main_entry; main_entry()", "run", "train-and-publish",
         "--run-dir", str(run_dir), *overrides],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    ckpt_root = run_dir / "train" / "checkpoints"
    pointer = ckpt_root / "latest_checkpointed_iteration.txt"
    try:
        deadline = time.monotonic() + 600
        while not pointer.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        _kill_tree(proc)
    assert pointer.exists(), "no checkpoint was written before the deadline"
    killed_at = int(pointer.read_text())
    assert killed_at < STEPS, "the run finished before it could be killed"
    saved = load_file(str(ckpt_root / f"global_step_{killed_at}" / "adapter" / "adapter_model.safetensors"))
    m = read_manifest(run_dir)
    assert next(s for s in m["stages"] if s["name"] == "train")["status"] == "running"  # killed mid-stage

    assert cli_entry(["run", "train-and-publish", "--resume", str(run_dir)]) == 0
    m = read_manifest(run_dir)
    assert m["status"] == "succeeded" and len(m["attempts"]) == 2
    out = {s["name"]: s.get("outputs") for s in m["stages"]}
    # the same final step; every step once in the history, the resumed ones finite
    assert out["train"]["steps"] == STEPS
    history = [json.loads(line) for line in Path(out["train"]["history_path"]).read_text().splitlines() if line]
    steps = [h for h in history if "reward/mean" in h]
    assert [h["step"] for h in steps] == list(range(1, STEPS + 1))
    for h in steps[killed_at:]:
        assert all(math.isfinite(v) for v in h.values() if isinstance(v, float))
    # the LR warmup continued where it stopped (a fresh scheduler would restart at LR/WARMUP)
    assert steps[killed_at]["actor/lr"] == pytest.approx(LR * (killed_at + 1) / WARMUP)
    # Adam continued: its step count covers the steps before the kill too
    optim = torch.load(ckpt_root / f"global_step_{STEPS}" / "optimizer.pt", weights_only=True)
    assert {int(st["step"]) for st in optim["state"].values()} == {STEPS}
    # the data position continued: 64 prompts / 4 per batch = 16 batches per epoch, STEPS consumed
    state = json.loads((ckpt_root / f"global_step_{STEPS}" / "trainer_state.json").read_text())
    assert state["data"]["step_in_epoch"] == STEPS and state["data"]["epoch"] == 0
    # the resumed adapter = the checkpointed one + what (STEPS - killed_at) Adam steps can move: Adam moves a
    # weight by at most about lr per step (|m_hat / sqrt(v_hat)| <= ~1 here; 1.5 leaves room), no weight decay
    final = load_file(str(ckpt_root / f"global_step_{STEPS}" / "adapter" / "adapter_model.safetensors"))
    max_move = max((final[k] - saved[k]).abs().max().item() for k in saved)
    assert 0 < max_move <= 1.5 * LR * (STEPS - killed_at)
    returned = load_file(str(Path(out["train"]["adapter_dir"]) / "adapter_model.safetensors"))
    assert all(torch.equal(returned[k], final[k]) for k in final)
    assert out["train"]["mlflow_run_id"] == state["mlflow_run_id"]  # the same MLflow run continued

    # exactly one published version, although publishing ran after a crash and a resume
    reg = open_registry(str(tmp_path / "registry"))
    assert [v.version for v in reg.list_versions("toy-digits")] == [1]
    assert reg.resolve("toy-digits@prod").metadata["lineage"]["run_id"] == "killed"
