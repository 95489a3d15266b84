"""A tool's final `calc_reward`, as verl runs it: once per sample after its last turn (with the row's
`tools_kwargs[<tool>].calc_reward_kwargs`), then `release` (with `release_kwargs`); the reward function gets
each tool's value as extra_info["rollout_reward_scores"] and the turn count as extra_info["num_turns"]."""

from __future__ import annotations

from stages.train.agent_loops import run_agent_loops
from stages.train.tools import load_tools
from tests.stages.train.agent_loop_helpers import ScriptedEngine
from tests.stages.train.test_agent_loop import CALCULATOR_YAML, _cfg, tokenizer  # noqa: F401 (fixture)
from tests.stages.train.test_agent_loop_trainer import _trainer

class ScoringTool:
    """Counts its calls per sample; calc_reward pays `per_call` for each (the row says how much)."""

    def __init__(self, config, tool_schema):
        self.tool_schema, self.name, self.timeout = tool_schema, tool_schema["function"]["name"], 5.0
        self.calls: dict[str, int] = {}
        self.events: list[tuple] = []

    def get_openai_tool_schema(self):
        return self.tool_schema

    async def create(self, instance_id=None, **kwargs):
        instance_id = f"sample-{len(self.calls)}"
        self.calls[instance_id] = 0
        return instance_id

    async def execute(self, instance_id, parameters, **kwargs):
        self.calls[instance_id] += 1
        return "noted", 0.0, {}

    async def calc_reward(self, instance_id, per_call=0.0, **kwargs):
        self.events.append(("calc_reward", instance_id, per_call))
        return per_call * self.calls[instance_id]

    async def release(self, instance_id, **kwargs):
        self.events.append(("release", instance_id, kwargs))
        self.calls.pop(instance_id)


TOOLS_YAML = CALCULATOR_YAML + f"""\
  - class_name: {__file__}:ScoringTool
    tool_schema:
      type: function
      function: {{name: scorer, description: counts calls, parameters: {{type: object, properties: {{}}}}}}
"""
SCORER_CALL = '<tool_call>{"name": "scorer", "arguments": {}}</tool_call>'


def test_calc_reward_runs_after_the_last_turn_with_the_rows_kwargs_then_release(tmp_path, tokenizer):  # noqa: F811
    tools_kwargs = {"scorer": {"calc_reward_kwargs": {"per_call": 0.25}, "release_kwargs": {"why": "done"}}}
    item = {"messages": [{"role": "user", "content": "hi"}], "prompt_ids": [], "uid": "u0",
            "extra_info": {"tools_kwargs": tools_kwargs}}
    cfg = _cfg(tmp_path, TOOLS_YAML, "actor_rollout_ref.rollout.multi_turn.max_parallel_calls=2")
    tools = load_tools(cfg.actor_rollout_ref.rollout.multi_turn.tool_config_path)
    engine = ScriptedEngine(tokenizer, [SCORER_CALL + SCORER_CALL, SCORER_CALL, "bye"])
    out = run_agent_loops([item], 1, cfg=cfg, tokenizer=tokenizer, tools=tools, generate_many=engine,
                          response_length=400, max_model_len=1024)[0][0]
    assert out.tool_calls == 3
    # every tool's final reward, by name: 3 calls x 0.25; the calculator (no calc_reward of its own) 0.0
    assert out.tool_rewards == {"calculator": 0.0, "scorer": 0.75}
    assert tools["scorer"].events == [("calc_reward", "sample-0", 0.25), ("release", "sample-0", {"why": "done"})]
    assert not out.turn_rewards  # a final reward is not a step reward: nothing placed on a turn


def test_the_reward_function_gets_each_samples_tool_rewards_and_turns(tiny_model_dir, tmp_path):
    trainer, tokenizer = _trainer(tiny_model_dir, tmp_path)
    seen = []

    def recording_reward_fn(data_sources, texts, ground_truths, extra_infos):
        seen.extend(extra_infos)
        return [{"score": 0.0} for _ in texts]

    trainer.reward_fn = recording_reward_fn
    items = trainer.val_items[:2]
    rollout = trainer._rollout(items, n=2)
    trainer._score(rollout)
    assert len(seen) == 4
    for info, item in zip(seen, [it for it in items for _ in range(2)]):
        assert info["rollout_reward_scores"] == {"calculator": 0.0}
        assert info["num_turns"] == 4  # user, the call, the tool's answer, the final answer
        assert {k: info[k] for k in item["extra_info"]} == item["extra_info"]  # the row's own keys kept
    assert all("rollout_reward_scores" not in (it["extra_info"] or {}) for it in items)  # rows left as they were
