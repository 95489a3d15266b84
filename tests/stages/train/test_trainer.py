"""Training on the tiny model: real Ray, 2 FSDP2 workers over gloo, a real vLLM engine.

(GRPO learning the toy task, with its MLflow run, and kill-then-resume run through the whole pipeline in
tests/pipeline/test_train_and_publish.py, so each costs one training run in the suite.)
- PPO (gae, with the critic adapter + value head), adapter sync, layered gather, a KL loss (so reference
  log-probs run), 2 PPO epochs over 2 shuffled mini-batches (so the separate old-log-prob pass runs),
  validation in chunks and the overlong reward logged completes with finite metrics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.stages.train.toy_task import toy_overrides

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def _history(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_ppo_with_critic_adapter_sync_completes_with_finite_metrics(tiny_model_dir, tmp_path):
    from config import load_config
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
        # keys honoured on the real engine and workers (their effects are tested in test_actor_worker,
        # test_trainer_validation_pass): shuffled mini-batches, the reference's own micro-batch size, validation
        # in chunks, the overlong reward logged
        "actor_rollout_ref.actor.shuffle": True,
        "actor_rollout_ref.actor.ppo_mini_batch_size": 2,
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": 3,
        "data.val_batch_size": 3,
        "reward_model.overlong_buffer.enable": True,
        "reward_model.overlong_buffer.len": 4,
        "reward_model.overlong_buffer.log": True,
    }))
    outputs = train(cfg, str(tiny_model_dir), "fp", out_dir=str(tmp_path / "out"))
    assert outputs["steps"] == 3 and outputs["sync_mode"] == "adapter" and outputs["mlflow_run_id"] is None
    steps = [h for h in _history(outputs["history_path"]) if "reward/mean" in h]
    assert len(steps) == 3
    for key in ("critic/vf_loss", "critic/vf_clipfrac", "critic/grad_norm", "actor/kl_loss", "actor/kl_ref",
                "actor/pg_loss", "actor/ppo_kl", "actor/entropy", "timing/values", "timing/old_log_prob",
                "timing/reference", "reward/overlong_reward", "reward/overlong"):
        assert all(math.isfinite(h[key]) for h in steps), key
    # two PPO epochs: the second runs on moved weights, so the measured ratio differs from 1 somewhere
    assert any(h["actor/ppo_kl"] != 0 for h in steps)
    assert steps[0]["timing/old_log_prob"] > 0 and steps[0]["timing/reference"] > 0
    # the adapter sync sends only the LoRA tensors: a few KB for this rank-8 q/v adapter
    assert 0 < steps[0]["sync/bytes"] < 100_000
    closing = [h for h in _history(outputs["history_path"]) if "val/reward" in h]
    assert len(closing) == 1 and math.isfinite(closing[0]["val/overlong_reward"])


def test_max_actor_ckpt_to_keep_prunes_oldest_checkpoints(tmp_path):
    from stages.train import checkpoint

    for step in (2, 4, 6, 8):
        checkpoint.begin(tmp_path, step)
        checkpoint.commit(tmp_path, step, {"global_step": step}, keep_last=2)
    assert checkpoint.all_steps(tmp_path) == [6, 8]
    checkpoint.begin(tmp_path, 10)
    checkpoint.commit(tmp_path, 10, {"global_step": 10}, keep_last=None)  # None keeps everything
    assert checkpoint.all_steps(tmp_path) == [6, 8, 10]


def test_max_actor_ckpt_to_keep_below_one_is_refused():
    from config import load_config
    from ground.errors import ConfigError

    with pytest.raises(ConfigError, match="trainer.max_actor_ckpt_to_keep=0 must be >= 1"):
        load_config(None, ["trainer.max_actor_ckpt_to_keep=0"])
