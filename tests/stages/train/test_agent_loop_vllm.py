"""The tool agent loop against the real vLLM rollout engine on the tiny model: the ids path, token-in/token-out.

The tiny model's random weights never write a tool call, so a loop registered here (a subclass of tool_agent,
which also shows custom loops registering by name) calls the calculator after every turn, cut or not.
One engine for the module (~30 s to start).
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from config.loader import load_config
from stages.train.agent_loops import ToolAgentLoop, register, run_agent_loops
from stages.train.rollout import RolloutEngine
from stages.train.tools import ToolCall, load_tools
from tests.stages.train.test_agent_loop import CALCULATOR_YAML, MESSAGES

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
ROLLOUT_CFG = dict(load_format="safetensors", gpu_memory_utilization=0.1, tensor_model_parallel_size=1,
                   dtype="float32", enforce_eager=True, max_num_seqs=8)


@register("always_calculates")
class AlwaysCalculates(ToolAgentLoop):
    def tool_calls_of(self, text: str, ended: bool) -> list:
        return [ToolCall("calculator", {"expression": "6*7"})]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with RolloutEngine(str(tiny_model_dir), ROLLOUT_CFG, lora_rank=8, max_model_len=512, seed=0,
                       sync_mode="merged") as eng:
        yield eng


def test_real_engine_continues_from_exactly_the_loops_ids(engine, tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    (tmp_path / "tools.yaml").write_text(CALCULATOR_YAML)
    cfg = load_config(None, ["actor_rollout_ref.rollout.multi_turn.enable=True", "data.return_raw_chat=True",
                             f"actor_rollout_ref.rollout.multi_turn.tool_config_path={tmp_path / 'tools.yaml'}",
                             "actor_rollout_ref.rollout.multi_turn.max_assistant_turns=3"])
    calls = []

    def generate_many(prompts, budgets):
        outs = [o[0] for o in engine.generate(prompts, n=1, max_tokens=[min(b, 12) for b in budgets],
                                              temperature=1.0, top_p=1.0, top_k=-1)]
        calls.append([(list(p), list(o["token_ids"])) for p, o in zip(prompts, outs)])
        return outs

    items = [{"messages": MESSAGES, "prompt_ids": [], "uid": "u0", "extra_info": {}, "agent_name": "always_calculates"},
             {"messages": MESSAGES, "prompt_ids": [], "uid": "u1", "extra_info": {}, "agent_name": "single_turn"}]
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    items[1]["prompt_ids"] = tokenizer(text, add_special_tokens=False)["input_ids"]
    outs = run_agent_loops(items, 2, cfg=cfg, tokenizer=tokenizer, tools=load_tools(str(tmp_path / "tools.yaml")),
                           generate_many=generate_many, response_length=200, max_model_len=512)
    assert [len(c) for c in calls] == [4, 2, 2]  # turn 1 of all four samples, then the two tool-agent samples
    for sample in outs[0]:
        full = sample.prompt_ids + sample.response_ids
        # each turn: exactly one engine request was these ids so far, and its answer follows them verbatim
        mine = [(p, r) for batch in calls for p, r in batch if full[:len(p) + len(r)] == p + r]
        assert [len(p) for p, _ in mine] == sorted({len(p) for p, _ in mine}) and len(mine) == 3
        assert sample.tool_calls == 2 and full == mine[-1][0] + mine[-1][1]
        assert sum(sample.response_mask) == sum(len(r) for _, r in mine)  # 1 exactly on sampled tokens
        assert "<|im_start|>tool\n42<|im_end|>" in tokenizer.decode(full)
        assert all(lp < 0 for lp, m in zip(sample.response_logprobs, sample.response_mask) if m)
    for sample in outs[1]:
        assert sample.prompt_ids == items[1]["prompt_ids"] and sample.tool_calls == 0
