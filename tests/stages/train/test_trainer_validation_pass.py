"""The trainer's validation pass and reward shaping on the real tokenizer, dataset and scorer.

The rollout engine is replaced by a stand-in that answers each prompt with a response of a chosen length, so
these tests run in a second; the real engine runs the same code in test_trainer.py and the pipeline tests.
"""

from __future__ import annotations

import pytest

from tests.stages.train.toy_task import toy_overrides


def _trainer(tiny_model_dir, tmp_path, extra: dict):
    from transformers import AutoTokenizer

    from config import load_config
    from stages.train.data import PromptDataset
    from stages.train.rewards import RewardFunction
    from stages.train.trainer import Trainer

    cfg = load_config(None, toy_overrides(tiny_model_dir, tmp_path, steps=1, extra=extra))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    val_items = PromptDataset(cfg.data.val_files, tokenizer, cfg.data).items
    return Trainer(cfg, workers=None, engine=None, tokenizer=tokenizer, train_iter=None, val_items=val_items,
                   reward_fn=RewardFunction(cfg), tracking=None, sync_mode="merged", sync_dir=tmp_path,
                   out_dir=tmp_path, total_steps=1)


class EngineStandIn:
    """Answers `generate` with n responses per prompt of lengths 2, 6, 8, 2, 6, 8, ... tokens; records calls."""

    LENGTHS = (2, 6, 8)

    def __init__(self):
        self.calls: list[int] = []
        self.k = 0

    def __call__(self, method, prompts, n=1, **sampling):
        assert method == "generate"
        self.calls.append(len(prompts))
        out = []
        for _ in prompts:
            group = []
            for _ in range(n):
                length = self.LENGTHS[self.k % len(self.LENGTHS)]
                self.k += 1
                group.append({"token_ids": [7] * length, "finish_reason": "length" if length == 8 else "stop"})
            out.append(group)
        return out


@pytest.mark.parametrize("val_batch_size, calls", [(None, [8]), (3, [3, 3, 2]), (8, [8]), (100, [8])])
def test_validation_generates_val_batch_size_prompts_at_a_time(tiny_model_dir, tmp_path, val_batch_size, calls):
    trainer = _trainer(tiny_model_dir, tmp_path, {"data.val_batch_size": "null" if val_batch_size is None
                                                  else val_batch_size})
    assert len(trainer.val_items) == 8
    trainer._call_engine = engine = EngineStandIn()
    out = trainer.validate()
    assert engine.calls == calls
    assert 0 <= out["val/reward"] <= 1 and out["val/response_length"] == pytest.approx((2 + 6 + 8 + 2 + 6 + 8 + 2 + 6) / 8)


def test_overlong_reward_is_logged_with_overlong_buffer_log(tiny_model_dir, tmp_path):
    # budget 8, buffer 4: lengths 2 and 6 -> 0 and -0.5, length 8 -> -1 (penalty_factor 1)
    shaping = {"reward_model.overlong_buffer.enable": True, "reward_model.overlong_buffer.len": 4}
    quiet = _trainer(tiny_model_dir, tmp_path, shaping)
    quiet._call_engine = EngineStandIn()
    assert not any("overlong" in k for k in quiet.validate())

    logged = _trainer(tiny_model_dir, tmp_path, {**shaping, "reward_model.overlong_buffer.log": True})
    logged._call_engine = EngineStandIn()
    out = logged.validate()
    penalties = [0, -0.5, -1, 0, -0.5, -1, 0, -0.5]
    assert out["val/overlong_reward"] == pytest.approx(sum(penalties) / 8)
    assert out["val/overlong"] == pytest.approx(5 / 8)
