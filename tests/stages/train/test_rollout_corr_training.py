"""Rollout correction in a real 2-step run on the tiny model (Ray, 2 FSDP2 workers, a real vLLM engine)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.stages.train.toy_task import toy_overrides

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

MISMATCH = ("kl", "k3_kl", "log_ppl_abs_diff", "chi2_token", "rollout_is_mean")


def test_two_steps_with_token_tis_and_rejection_log_rollout_corr_metrics(tiny_model_dir, tmp_path):
    from config import load_config
    from stages.train import train

    cfg = load_config(None, toy_overrides(tiny_model_dir, tmp_path, steps=2, extra={
        "actor_rollout_ref.rollout.calculate_log_probs": True,
        "algorithm.rollout_correction.rollout_is": "token",
        "algorithm.rollout_correction.rollout_rs": "token_k1",
        "algorithm.rollout_correction.rollout_rs_threshold": "0.01_100.0",  # two dots: stays a string
        "trainer.val_before_train": False,
        "trainer.logger": "[console]",
    }))
    outputs = train(cfg, str(tiny_model_dir), "fp", out_dir=str(tmp_path / "out"))
    lines = Path(outputs["history_path"]).read_text().splitlines()
    steps = [h for h in map(json.loads, lines) if "reward/mean" in h]
    assert len(steps) == 2
    for h in steps:
        for key in MISMATCH + ("rollout_is_weight_mean", "rollout_rs_masked_fraction"):
            assert math.isfinite(h[f"rollout_corr/{key}"]), key
        assert h["rollout_corr/k3_kl"] >= 0
        # same weights, float32 on both sides: the engine and the actor agree closely on each sampled token
        assert abs(h["rollout_corr/rollout_is_mean"] - 1.0) < 0.1
        assert 0 <= h["rollout_corr/rollout_rs_masked_fraction"] < 0.5
