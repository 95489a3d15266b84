"""End-to-end training on the tiny model: real Ray, 2 FSDP2 workers over gloo, a real vLLM engine, real MLflow.

- GRPO through `pipeline train` on the toy task raises the greedy validation reward over the base's, and the
  MLflow run holds the parameters, the per-step metrics and the adapter artifact.
- PPO (gae, with the critic adapter + value head), adapter sync, layered gather, a KL loss (so reference
  log-probs run) and 2 PPO epochs (so the separate old-log-prob pass runs) completes with finite metrics.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from tests.stages.train.toy_task import toy_overrides

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def _history(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_grpo_learns_toy_task_and_tracks_in_mlflow(tiny_model_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.cli import cli_entry

    out = tmp_path / "out"
    args = ["train", "--out-dir", str(out), *toy_overrides(tiny_model_dir, tmp_path, steps=10, extra={
        "trainer.test_freq": 5, "trainer.save_freq": 5})]
    assert cli_entry(args) == 0
    outputs = json.loads((out / "train_outputs.json").read_text())

    # Learning: the base model's greedy responses hold ~2% digits; the trained policy's far more.
    assert outputs["steps"] == 10
    gain = outputs["val_reward_after"] - outputs["val_reward_before"]
    assert outputs["val_reward_before"] < 0.1 and gain > 0.3, outputs
    history = _history(outputs["history_path"])
    steps = [h for h in history if "reward/mean" in h]
    vals = [h for h in history if "val/reward" in h]
    assert [h["step"] for h in steps] == list(range(1, 11))
    assert [h["step"] for h in vals] == [0, 5, 10]
    for key in ("reward/std", "reward/acc", "response_length/mean", "actor/entropy", "actor/pg_clipfrac",
                "actor/grad_norm", "actor/lr", "timing/generate", "timing/update", "timing/sync",
                "perf/tokens_per_s", "sync/bytes"):
        assert all(math.isfinite(h[key]) for h in steps), key
    assert set(outputs["phase_seconds"]) >= {"generate", "reference", "old_log_prob", "update", "sync"}
    for key in ("base_fingerprint", "config_digest", "data_fingerprint", "mlflow_run_id"):
        assert outputs[key]

    # The adapter is a PEFT folder with lora_alpha preserved; checkpoints were written at 5 and 10.
    adapter_cfg = json.loads((Path(outputs["adapter_dir"]) / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and adapter_cfg["lora_alpha"] == 16
    ckpt_root = Path(outputs["checkpoint_dir"])
    assert (ckpt_root / "latest_checkpointed_iteration.txt").read_text() == "10"
    assert (ckpt_root / "global_step_5" / "adapter" / "adapter_model.safetensors").is_file()

    # MLflow: params (every resolved key), per-step metrics, validation metrics, the adapter artifact.
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(outputs["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["actor_rollout_ref.model.lora_rank"] == "8"
    assert run.data.params["algorithm.adv_estimator"] == "grpo"
    assert len(run.data.params) > 100
    assert len(client.get_metric_history(run.info.run_id, "reward/mean")) == 10
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/reward")] == [0, 5, 10]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= artifacts


def test_ppo_with_critic_adapter_sync_completes_with_finite_metrics(tiny_model_dir, tmp_path):
    from pipeline.config import load_config
    from stages.train import train

    cfg = load_config(None, toy_overrides(tiny_model_dir, tmp_path, steps=3, extra={
        "algorithm.adv_estimator": "gae",
        "actor_rollout_ref.model.target_modules": "[q_proj,v_proj]",
        "actor_rollout_ref.rollout.lora_sync": "adapter",
        "actor_rollout_ref.rollout.layered_summon": True,
        "actor_rollout_ref.actor.use_kl_loss": True,
        "actor_rollout_ref.actor.ppo_epochs": 2,
        "actor_rollout_ref.actor.optim.lr": 1e-2,
        "trainer.val_before_train": False,
        "trainer.logger": "[console]",
    }))
    outputs = train(cfg, str(tiny_model_dir), "fp", out_dir=str(tmp_path / "out"))
    assert outputs["steps"] == 3 and outputs["sync_mode"] == "adapter" and outputs["mlflow_run_id"] is None
    steps = [h for h in _history(outputs["history_path"]) if "reward/mean" in h]
    assert len(steps) == 3
    for key in ("critic/vf_loss", "critic/vf_clipfrac", "critic/grad_norm", "actor/kl_loss", "actor/kl_ref",
                "actor/pg_loss", "actor/ppo_kl", "actor/entropy", "timing/values", "timing/old_log_prob",
                "timing/reference"):
        assert all(math.isfinite(h[key]) for h in steps), key
    # two PPO epochs: the second runs on moved weights, so the measured ratio differs from 1 somewhere
    assert any(h["actor/ppo_kl"] != 0 for h in steps)
    assert steps[0]["timing/old_log_prob"] > 0 and steps[0]["timing/reference"] > 0
    # the adapter sync sends only the LoRA tensors: a few KB for this rank-8 q/v adapter
    assert 0 < steps[0]["sync/bytes"] < 100_000
