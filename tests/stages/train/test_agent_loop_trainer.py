"""A trainer step with multi-turn rollouts: what reaches the actor update has tool tokens masked everywhere.

The engine is a scripted stand-in (tool call, then an answer) and the workers a recorder, so this runs in
seconds; the actor's losses under such masks are covered in test_agent_loop.py, the real engine's ids path in
test_agent_loop_vllm.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.stages.train.agent_loop_helpers import CALL, ScriptedEngine
from tests.stages.train.test_agent_loop import CALCULATOR_YAML
from tests.stages.train.toy_task import toy_overrides


class RecordingWorkers:
    def __init__(self):
        self.batches = []

    def compute_log_probs(self, batch, role):
        return {"log_probs": torch.zeros(batch["responses"].shape)}

    def update_actor(self, batch, num_mini_batches, reuse_forward_as_old):
        self.batches.append(batch)
        return {}

    def sync_weights(self, target, mode, layered):
        return {"bytes": 0, "seconds": 0.0}


def _trainer(tiny_model_dir, tmp_path, extra=None):
    from transformers import AutoTokenizer

    from config import load_config
    from stages.train.data import BatchIterator, PromptDataset
    from stages.train.rewards import RewardFunction
    from stages.train.trainer import Trainer

    (tmp_path / "tools.yaml").write_text(CALCULATOR_YAML)
    cfg = load_config(None, toy_overrides(tiny_model_dir, tmp_path, steps=1, extra={
        "actor_rollout_ref.rollout.multi_turn.enable": True, "data.return_raw_chat": True,
        "actor_rollout_ref.rollout.multi_turn.tool_config_path": str(tmp_path / "tools.yaml"),
        "data.max_response_length": 200, "trainer.sync_check_freq": 0, **(extra or {})}))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    train = PromptDataset(cfg.data.train_files, tokenizer, cfg.data)
    val_items = PromptDataset(cfg.data.val_files, tokenizer, cfg.data).items
    trainer = Trainer(cfg, workers=RecordingWorkers(), engine=None, tokenizer=tokenizer,
                      train_iter=BatchIterator(train, cfg.data.train_batch_size), val_items=val_items,
                      reward_fn=RewardFunction(cfg), tracking=None, sync_mode="merged", sync_dir=tmp_path,
                      out_dir=tmp_path, total_steps=1)
    engine = ScriptedEngine(tokenizer, [CALL, "It is xyz"])

    def call_engine(method, *args, **kwargs):
        if method == "generate":
            prompts, budgets = args[0], kwargs["max_tokens"]
            assert kwargs["n"] == 1 and isinstance(budgets, list)
            return [[out] for out in engine(prompts, budgets)]
        return {"seconds": 0.0}

    trainer._call_engine = call_engine
    return trainer, tokenizer


def test_a_multi_turn_step_masks_tool_tokens_in_everything_the_update_gets(tiny_model_dir, tmp_path):
    trainer, tokenizer = _trainer(tiny_model_dir, tmp_path)
    metrics = trainer.step()
    batch = trainer.workers.batches[0]
    mask, responses = batch["response_mask"], batch["responses"]
    assert mask.shape[0] == 4 * 4
    for row in range(mask.shape[0]):
        ids = responses[row][batch["attention_mask"][row, -responses.shape[1]:].bool()].tolist()
        masked_text = tokenizer.decode([t for t, m in zip(ids, mask[row].tolist()) if not m])
        assert masked_text == "\n<|im_start|>tool\n408<|im_end|>\n<|im_start|>assistant\n"
    tool = (mask == 0) & (batch["attention_mask"][:, -mask.shape[1]:] == 1)
    assert tool.any() and not batch["advantages"][tool].any()
    # the reward scores the model's own text only: CALL's digits (12, 34), never the tool's 408
    share = lambda text: sum(ch.isdigit() for ch in text) / len(text)  # noqa: E731 - the toy reward
    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    model_text = tokenizer.decode(encode(CALL) + encode("It is xyz"), skip_special_tokens=True)
    assert "408" not in model_text and metrics["reward/mean"] == pytest.approx(share(model_text), rel=1e-6)
    assert metrics["multi_turn/tool_calls"] == 1 and metrics["multi_turn/tool_call_rate"] == 1
    assert metrics["multi_turn/num_turns"] == 4 and metrics["multi_turn/tool_errors"] == 0
    assert metrics["response_length/mean"] == pytest.approx(float(mask.sum(-1).mean()))  # model tokens only


def test_validation_logs_tool_use_and_counts_model_tokens(tiny_model_dir, tmp_path):
    trainer, tokenizer = _trainer(tiny_model_dir, tmp_path)
    out = trainer.validate()
    model_tokens = len(tokenizer(CALL, add_special_tokens=False)["input_ids"]) + \
        len(tokenizer("It is xyz", add_special_tokens=False)["input_ids"]) + 2  # each turn's end-of-turn token
    assert out["val/response_length"] == model_tokens
    assert out["val/multi_turn/tool_call_rate"] == 1.0
