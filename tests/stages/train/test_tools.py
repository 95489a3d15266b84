"""Tools: the calculator's safe evaluation, verl's GSM8K tool and its recipe keys, hermes parsing, YAML errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from config.loader import load_config
from ground.errors import ConfigError
from stages.train.agent_loops import run_agent_loops
from stages.train.core_algos import check_algorithm_names
from stages.train.tools import load_tools, parse_tool_calls
from stages.train.tools.calculator import CalculatorError, calculate
from stages.train.tools.gsm8k import Gsm8kTool
from tests.stages.train.agent_loop_helpers import ScriptedEngine

ROOT = Path(__file__).resolve().parents[3]
GSM8K_YAML = ROOT / "examples/tools/gsm8k_tool_config.yaml"


def test_calculator_evaluates_arithmetic_and_refuses_everything_else():
    assert calculate("37 * 48") == "1776" and calculate("(2 + 3) ** 2 - 7 // 2") == "22"
    assert calculate("1 / 4") == "0.25" and calculate("-3 % 5") == "2"
    for bad in ("__import__('os').system('true')", "x + 1", "(1).__class__", "9 ** 9 ** 9", "1 / 0",
                "10 ** 200", "2 +", "[1, 2]", "1" * 300):
        with pytest.raises(CalculatorError):
            calculate(bad)


def test_hermes_parsing():
    calls = parse_tool_calls('a <tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call> b '
                             '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'
                             "<tool_call>not json</tool_call><tool_call>[1]</tool_call>")
    assert [(c.name, c.arguments, bool(c.error)) for c in calls] == [
        ("calculator", {"expression": "1+1"}, False), ("f", {"x": 1}, False), ("", {}, True), ("", {}, True)]
    assert parse_tool_calls("no call here") == []


def test_verls_gsm8k_tool_recipe_keys_resolve():
    overrides = ["data.return_raw_chat=True", "actor_rollout_ref.rollout.name=vllm",
                 "actor_rollout_ref.rollout.multi_turn.enable=True",
                 "actor_rollout_ref.rollout.multi_turn.max_assistant_turns=5",
                 "actor_rollout_ref.rollout.multi_turn.format=hermes",
                 f"actor_rollout_ref.rollout.multi_turn.tool_config_path={GSM8K_YAML}",
                 "actor_rollout_ref.rollout.multi_turn.max_user_turns=5",
                 "actor_rollout_ref.rollout.multi_turn.max_parallel_calls=1",
                 "actor_rollout_ref.rollout.multi_turn.max_tool_response_length=256",
                 "actor_rollout_ref.rollout.multi_turn.tool_response_truncate_side=middle",
                 "actor_rollout_ref.rollout.multi_turn.tokenization_sanity_check_mode=ignore_strippable"]
    cfg = load_config(None, overrides)
    check_algorithm_names(cfg)
    tools = load_tools(cfg.actor_rollout_ref.rollout.multi_turn.tool_config_path)
    assert list(tools) == ["calc_gsm8k_reward"] and isinstance(tools["calc_gsm8k_reward"], Gsm8kTool)
    with pytest.raises(ConfigError, match="multi_turn.no_such_key"):
        load_config(None, ["actor_rollout_ref.rollout.multi_turn.no_such_key=1"])


def test_gsm8k_tool_scores_the_answer_and_penalises_no_progress():
    tool = load_tools(str(GSM8K_YAML))["calc_gsm8k_reward"]

    async def session():
        iid = await tool.create(ground_truth="72")
        wrong = await tool.execute(iid, {"answer": "70"})
        right = await tool.execute(iid, {"answer": "72"})
        again = await tool.execute(iid, {"answer": "72"})
        final = await tool.calc_reward(iid)
        await tool.release(iid)
        return wrong, right, again, final

    wrong, right, again, final = asyncio.run(session())
    assert [r[1] for r in (wrong, right, again)] == [-0.05, 0.0, -0.05] and final == 1.0
    assert "reward=1.0" in right[0].text


def test_gsm8k_tool_rewards_land_on_the_calling_turns_last_token(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = load_config(None, ["actor_rollout_ref.rollout.multi_turn.enable=True", "data.return_raw_chat=True"])
    call = '<tool_call>{"name": "calc_gsm8k_reward", "arguments": {"answer": "70"}}</tool_call>'
    engine = ScriptedEngine(tokenizer, [call, "#### 70"])
    item = {"messages": [{"role": "user", "content": "q"}], "prompt_ids": [], "uid": "u", "extra_info": {
        "tools_kwargs": {"calc_gsm8k_reward": {"create_kwargs": {"ground_truth": "72"}}}}}
    out = run_agent_loops([item], 1, cfg=cfg, tokenizer=tokenizer, tools=load_tools(str(GSM8K_YAML)),
                          generate_many=engine, response_length=300, max_model_len=1024)[0][0]
    first = engine.given[0]
    assert out.turn_rewards == [(len(first) - 1, -0.05)]
    assert "reward=0.0" in out.messages[2]["content"]


@pytest.mark.parametrize("text, match", [
    ("tools: []", "non-empty list"),
    ("tools: [{class_name: calculator}]", "tool_schema must be an OpenAI function schema"),
    ("tools: [{class_name: nosuch, tool_schema: {function: {name: f}}}]", "'nosuch' is not a known tool"),
    ("tools: [{class_name: no.such.Module, tool_schema: {function: {name: f}}}]", "failed to import"),
    ("tools: [{class_name: calculator, config: {timeout: 0}, tool_schema: {function: {name: f}}}]", "timeout=0"),
    ("tools: [{class_name: calculator, tool_schema: {function: {name: f}}},"
     " {class_name: calculator, tool_schema: {function: {name: f}}}]", "second tool named 'f'"),
])
def test_bad_tool_yaml_is_refused_naming_the_entry(tmp_path, text, match):
    path = tmp_path / "tools.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_tools(str(path))
    with pytest.raises(ConfigError, match="no such file"):
        load_tools(str(tmp_path / "missing.yaml"))
