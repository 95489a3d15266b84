"""examples/tool_calculator.yaml loads as a multi-turn run with the calculator, and its data generator writes rows
the loader accepts, whose worked example renders exactly as the tool agent appends a tool turn."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import AutoTokenizer

from config import load_config
from stages.train.agent_loops import check_config, default_agent_name
from stages.train.chat_turns import ChatTurns
from stages.train.data import load_rows

ROOT = Path(__file__).resolve().parents[3]


def _generator():
    spec = importlib.util.spec_from_file_location("tool_calculator_data", ROOT / "examples" / "tool_calculator_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_config_loads_with_its_tool(monkeypatch):
    monkeypatch.chdir(ROOT)  # the example's paths are relative to a clone's root, as its comment says
    cfg = load_config(str(ROOT / "examples" / "tool_calculator.yaml"), [])
    check_config(cfg)
    mt = cfg.actor_rollout_ref.rollout.multi_turn
    assert mt.enable and cfg.data.return_raw_chat and default_agent_name(cfg) == "tool_agent"
    assert cfg.actor_rollout_ref.rollout.val_kwargs.n == 4


def test_generated_rows_are_held_out_and_their_example_renders_like_the_loop(tmp_path, tiny_model_dir):
    train, test = _generator().make(tmp_path, n_train=64, n_test=8, low=10, high=99, seed=0)
    train_rows, test_rows = load_rows(train), load_rows(test)
    question = lambda r: (r["extra_info"]["a"], r["extra_info"]["b"])  # noqa: E731
    assert not {question(r) for r in test_rows} & {question(r) for r in train_rows}
    row = test_rows[0]
    a, b = question(row)
    assert row["reward_model"]["ground_truth"] == str(a * b) and row["agent_name"] == "tool_agent"
    # the worked example's tool turn is the same text the loop appends after a call
    turns = ChatTurns(AutoTokenizer.from_pretrained(tiny_model_dir), None)
    messages = row["prompt"]
    rendered = turns.render(messages, add_generation_prompt=True)
    tool_turn = turns.tokenizer.decode(turns.tool_turn_ids([{"role": "tool", "content": "943"}]))
    assert tool_turn in rendered
