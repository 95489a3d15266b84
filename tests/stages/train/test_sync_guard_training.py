"""The stale-adapter guard on the real engine: a sync broken on purpose fails the run at that step.

Real Ray, 2 FSDP2 workers over gloo, the real vLLM engine; only the trainer's call that loads the new weights
into the engine is dropped at step 2, so the engine keeps step 1's weights exactly as a silently failed reload
would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ground.errors import StageError
from tests.stages.train.toy_task import toy_overrides

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

BROKEN_STEP = 2


def test_a_sync_that_leaves_the_old_weights_fails_the_run_naming_the_step(tiny_model_dir, tmp_path, monkeypatch):
    from config import load_config
    from stages.train import train
    from stages.train.trainer import Trainer

    real_call = Trainer._call_engine

    def call_engine(self, method, *args, **kwargs):
        if method in ("update_merged", "update_adapter") and self.global_step + 1 == BROKEN_STEP:
            return {"seconds": 0.0}  # the reload "succeeds" and changes nothing
        return real_call(self, method, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_call_engine", call_engine)
    cfg = load_config(None, toy_overrides(tiny_model_dir, tmp_path, steps=3, extra={
        "trainer.val_before_train": False,
        "trainer.logger": "[console]",
    }))
    with pytest.raises(StageError, match=rf"^step {BROKEN_STEP}: the rollout engine did not take the new weights"):
        train(cfg, str(tiny_model_dir), "fp", out_dir=str(tmp_path / "out"))
    # step 1 synced for real and passed the same check, with its cost logged
    history = [json.loads(x) for x in (tmp_path / "out" / "history.jsonl").read_text().splitlines() if x.strip()]
    steps = [h for h in history if "reward/mean" in h]
    assert [h["step"] for h in steps] == [1]
    assert steps[0]["sync/check_cosine"] > 0.5 and steps[0]["timing/sync_check"] > 0
