"""The run's report names the rollout-training mismatch the training measured (rollout_corr/ metrics)."""

from __future__ import annotations

import pytest

from pipeline.report import render_text
from stages.train.recipe import rollout_mismatch


def _summary(mismatch):
    return {"run_id": "r1", "pipeline": "p", "status": "FINISHED", "created": "now", "stages": [],
            "validation": "greedy", "start_point": "base model", "start_reward": 0.1, "start_acc": None,
            "adapter_reward": 0.5, "adapter_acc": None, "decision": None, "published_ref": None,
            "phase_seconds": {}, "startup_seconds": {}, "mlflow_parent_run_id": None, "rollout_mismatch": mismatch}


def test_the_mismatch_is_the_mean_over_steps_and_the_report_shows_it():
    history = [{"step": 0, "val/reward": 0.1},
               {"step": 1, "rollout_corr/kl": 0.01, "rollout_corr/k3_kl": 0.002, "rollout_corr/log_ppl_abs_diff": 0.03,
                "rollout_corr/chi2_token": 0.004},
               {"step": 2, "rollout_corr/kl": 0.03, "rollout_corr/k3_kl": 0.004, "rollout_corr/log_ppl_abs_diff": 0.05,
                "rollout_corr/chi2_token": 0.006}]
    m = rollout_mismatch(history)
    assert m["steps"] == 2 and m["k3_kl"] == pytest.approx(0.003) and m["log_ppl_abs_diff"] == pytest.approx(0.04)
    text = "\n".join(render_text(_summary(m)))
    assert "Rollout-training mismatch" in text and "k3 KL 0.003" in text and "log-ppl diff| 0.04" in text


def test_without_the_engines_log_probs_there_is_no_mismatch_line():
    assert rollout_mismatch([{"step": 1, "reward/mean": 0.5}]) is None
    assert "mismatch" not in "\n".join(render_text(_summary(None)))
