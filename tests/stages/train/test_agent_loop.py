"""Agent loops on the tiny model's tokenizer with a scripted stand-in engine: masks, ids, tools, sanity check.

The real vLLM engine drives the same loop in test_agent_loop_vllm.py.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from transformers import AutoTokenizer

from config.loader import load_config
from ground.errors import ConfigError
from stages.train import agent_loops
from stages.train.agent_loops import AGENT_LOOPS, register, run_agent_loops
from stages.train.batch import build_tensors, flatten_agent_outputs, outcome_rewards
from stages.train.core_algos import check_algorithm_names
from stages.train.tools import load_tools
from tests.stages.train.agent_loop_helpers import CALL, ScriptedEngine
from tests.tiny_model import CHAT_TEMPLATE

CALCULATOR_YAML = """
tools:
  - class_name: calculator
    config: {timeout: 5}
    tool_schema:
      type: function
      function:
        name: calculator
        description: arithmetic
        parameters: {type: object, properties: {expression: {type: string}}, required: [expression]}
"""

MESSAGES = [{"role": "user", "content": "What is 12 * 34?"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _cfg(tmp_path, yaml_text=CALCULATOR_YAML, *more):
    path = tmp_path / "tools.yaml"
    path.write_text(yaml_text)
    return load_config(None, ["actor_rollout_ref.rollout.multi_turn.enable=True", "data.return_raw_chat=True",
                              f"actor_rollout_ref.rollout.multi_turn.tool_config_path={path}", *more])


def _run(cfg, tokenizer, engine, items=None, n=1, response_length=400):
    items = items or [{"messages": MESSAGES, "prompt_ids": [], "uid": "u0", "extra_info": {}}]
    tools = load_tools(cfg.actor_rollout_ref.rollout.multi_turn.tool_config_path)
    return run_agent_loops(items, n, cfg=cfg, tokenizer=tokenizer, tools=tools, generate_many=engine,
                           response_length=response_length, max_model_len=1024)


def test_mask_is_zero_exactly_over_the_tool_turn(tmp_path, tokenizer):
    engine = ScriptedEngine(tokenizer, [CALL, "The answer is 408."])
    out = _run(_cfg(tmp_path), tokenizer, engine)[0][0]
    first, second = engine.given
    tool_part = out.response_ids[len(first): len(out.response_ids) - len(second)]
    assert out.response_ids == first + tool_part + second
    assert out.response_mask == [1] * len(first) + [0] * len(tool_part) + [1] * len(second)
    # the tool turn is exactly the template's: separator, tool message, next assistant header
    assert tokenizer.decode(tool_part) == "\n<|im_start|>tool\n408<|im_end|>\n<|im_start|>assistant\n"
    assert out.response_logprobs == [-0.5] * len(first) + [0.0] * len(tool_part) + [-0.5] * len(second)
    assert (out.tool_calls, out.tool_errors, out.num_turns) == (1, 0, 4)


def test_the_engine_is_given_the_loops_own_ids_at_every_turn(tmp_path, tokenizer):
    engine = ScriptedEngine(tokenizer, [CALL, CALL, "408"])
    batches = []
    items = [{"messages": [{"role": "user", "content": f"What is {i} * 34?"}], "prompt_ids": [], "uid": f"u{i}",
              "extra_info": {}} for i in range(2)]
    outs = _run(_cfg(tmp_path), tokenizer, lambda p, b: batches.append(len(p)) or engine(p, b), items=items, n=2)
    samples = [o for group in outs for o in group]
    assert batches == [4, 4, 4]  # every turn of the 4 samples in one engine call
    for sample in samples:
        full = sample.prompt_ids + sample.response_ids
        calls = {len(seen): (seen, given) for seen, given in zip(engine.seen, engine.given) if full[:len(seen)] == seen}
        calls = [calls[k] for k in sorted(calls)]
        assert len(calls) == 3
        for seen, given in calls:  # token-in/token-out: what the engine got, then what it answered, verbatim
            assert full[len(seen): len(seen) + len(given)] == given
        assert full == calls[-1][0] + calls[-1][1]
        assert sample.prompt_ids == calls[0][0]


def test_max_parallel_calls_and_turn_limits(tmp_path, tokenizer):
    two_calls = CALL + CALL.replace("12*34", "2+2")
    engine = ScriptedEngine(tokenizer, [two_calls, "done"])
    out = _run(_cfg(tmp_path), tokenizer, engine)[0][0]
    assert out.tool_calls == 1  # max_parallel_calls defaults to 1
    engine = ScriptedEngine(tokenizer, [two_calls, "done"])
    out = _run(_cfg(tmp_path, CALCULATOR_YAML, "actor_rollout_ref.rollout.multi_turn.max_parallel_calls=2"),
               tokenizer, engine)[0][0]
    assert out.tool_calls == 2 and "\n4<|im_end|>" in tokenizer.decode(out.response_ids)
    engine = ScriptedEngine(tokenizer, [CALL])  # calls forever: the turn limit stops it
    out = _run(_cfg(tmp_path, CALCULATOR_YAML, "actor_rollout_ref.rollout.multi_turn.max_assistant_turns=3"),
               tokenizer, engine)[0][0]
    assert out.tool_calls == 2 and sum(1 for m in out.messages if m["role"] == "assistant") == 3


def test_a_raising_and_a_timing_out_tool_become_error_messages(tmp_path, tokenizer):
    module = tmp_path / "bad_tools.py"
    module.write_text(textwrap.dedent("""
        import time
        from stages.train.tools.base import BaseTool

        class Raises(BaseTool):
            async def execute(self, instance_id, parameters, **kwargs):
                raise RuntimeError("the backend is down")

        class Hangs(BaseTool):
            async def execute(self, instance_id, parameters, **kwargs):
                time.sleep(30)  # blocks its thread: only the timeout can stop the wait
                return "late", 0.0, {}
    """))
    schema = "{type: function, function: {name: %s, description: x, parameters: {type: object, properties: {}}}}"
    yaml_text = (f"tools:\n  - class_name: {module}:Raises\n    tool_schema: {schema % 'raises'}\n"
                 f"  - class_name: {module}:Hangs\n    config: {{timeout: 0.5}}\n    tool_schema: {schema % 'hangs'}\n")
    calls = ('<tool_call>{"name": "raises", "arguments": {}}</tool_call>'
             '<tool_call>{"name": "hangs", "arguments": {}}</tool_call>'
             '<tool_call>{"name": "nope", "arguments": {}}</tool_call>')
    engine = ScriptedEngine(tokenizer, [calls, "sorry"])
    cfg = _cfg(tmp_path, yaml_text, "actor_rollout_ref.rollout.multi_turn.max_parallel_calls=3")
    out = _run(cfg, tokenizer, engine)[0][0]
    tool_texts = [m["content"] for m in out.messages if m["role"] == "tool"]
    assert tool_texts[0] == "Error: tool 'raises' raised RuntimeError: the backend is down"
    assert tool_texts[1] == "Error: tool 'hangs' timed out after 0.5 s."
    assert tool_texts[2].startswith("Error: there is no tool named 'nope'")
    assert out.tool_errors == 3 and out.messages[-1] == {"role": "assistant", "content": "sorry"}


BROKEN = CHAT_TEMPLATE.replace(  # clears tool calls from earlier assistant turns (a failure verl users report)
    "message['content'] + '<|im_end|>'",
    "(message['content'].split('<tool_call>')[0] if message['role'] == 'assistant' and not loop.last "
    "else message['content']) + '<|im_end|>'")
SPACED = CHAT_TEMPLATE.replace(  # whitespace only: earlier assistant turns trimmed (as Llama 3's template does)
    "message['content'] + '<|im_end|>'",
    "(message['content'] | trim if message['role'] == 'assistant' and not loop.last else message['content'])"
    " + '<|im_end|>'")


def test_strict_sanity_check_catches_a_broken_template(tmp_path, tokenizer, tiny_model_dir):
    broken = AutoTokenizer.from_pretrained(tiny_model_dir)
    broken.chat_template = BROKEN
    engine = ScriptedEngine(broken, [CALL, "408"])
    with pytest.raises(ConfigError, match=r"differ .* at token position \d+ .*tool_call>.*the template"):
        _run(_cfg(tmp_path), broken, engine)
    for mode, passes in (("ignore_strippable", False), ("disable", True)):
        cfg = _cfg(tmp_path, CALCULATOR_YAML,
                   f"actor_rollout_ref.rollout.multi_turn.tokenization_sanity_check_mode={mode}")
        if passes:
            _run(cfg, broken, ScriptedEngine(broken, [CALL, "408"]))
        else:
            with pytest.raises(ConfigError, match="sanity check"):
                _run(cfg, broken, ScriptedEngine(broken, [CALL, "408"]))
    spaced = AutoTokenizer.from_pretrained(tiny_model_dir)
    spaced.chat_template = SPACED
    with pytest.raises(ConfigError, match="sanity check"):
        _run(_cfg(tmp_path), spaced, ScriptedEngine(spaced, [CALL + "\n", "408"]))
    _run(_cfg(tmp_path, CALCULATOR_YAML, "actor_rollout_ref.rollout.multi_turn.tokenization_sanity_check_mode="
              "ignore_strippable"), spaced, ScriptedEngine(spaced, [CALL + "\n", "408"]))
    _run(_cfg(tmp_path), tokenizer, ScriptedEngine(tokenizer, [CALL, "408"]))  # the intact template passes


def test_rows_choose_their_loop_and_single_turn_rows_keep_their_ids(tmp_path, tokenizer):
    engine = ScriptedEngine(tokenizer, [CALL, "408"])
    plain = {"messages": MESSAGES, "prompt_ids": [5, 6, 7], "uid": "a", "extra_info": {}, "agent_name": "single_turn"}
    tool = {"messages": MESSAGES, "prompt_ids": [5, 6, 7], "uid": "b", "extra_info": {}}
    outs = _run(_cfg(tmp_path), tokenizer, engine, items=[plain, tool])
    assert outs[0][0].prompt_ids == [5, 6, 7] and outs[0][0].tool_calls == 0
    assert outs[0][0].response_mask == [1] * len(outs[0][0].response_ids)
    assert outs[1][0].tool_calls == 1


def test_agent_loop_names_are_checked_when_the_config_loads(tmp_path):
    assert {"single_turn", "tool_agent"} <= set(AGENT_LOOPS) and "single_turn_agent" in AGENT_LOOPS
    cfg = load_config(None, ["actor_rollout_ref.rollout.agent.default_agent_loop=tool_agnet"])
    with pytest.raises(ConfigError, match=r"default_agent_loop='tool_agnet'.*valid: single_turn, tool_agent"):
        check_algorithm_names(cfg)
    with pytest.raises(ValueError, match="registered twice"):
        register("tool_agent")(type("Again", (), {}))
    with pytest.raises(ConfigError, match="return_raw_chat=True"):
        check_algorithm_names(load_config(None, ["actor_rollout_ref.rollout.multi_turn.enable=True"]))
    with pytest.raises(ConfigError, match="interaction_config_path.*not supported"):
        load_config(None, ["actor_rollout_ref.rollout.multi_turn.interaction_config_path=x.yaml"])
    with pytest.raises(Exception, match="agent_name='tool_agnt'"):
        agent_loops.check_items([{"agent_name": "tool_agnt"}], "single_turn", "data.train_files")


# ------------------------------------------------------------------------------------- masks in the losses
def _tool_rollout(tmp_path, tokenizer):
    """The same scripted conversation twice, its tool turn's tokens swapped for other tokens of the same length."""
    engine = ScriptedEngine(tokenizer, [CALL, "The answer is 408."])
    items = [{"messages": MESSAGES, "prompt_ids": [], "uid": "u0", "extra_info": {}}]
    r = flatten_agent_outputs(items, _run(_cfg(tmp_path), tokenizer, engine, items=items, n=4))
    other = [list(ids) for ids in r.response_ids]
    for row, mask in zip(other, r.response_masks):
        for j, m in enumerate(mask):
            if not m:
                row[j] = (row[j] * 7 + 3) % len(tokenizer)  # different content, same positions
    return r, other


def test_tool_tokens_change_neither_loss_gradient_nor_advantages(tmp_path, tokenizer):
    from config.schema import ActorConfig, AlgorithmConfig
    from stages.train.core_algos import ADV_ESTIMATORS, agg_loss, get_policy_loss_fn, kl_penalty

    r, other = _tool_rollout(tmp_path, tokenizer)
    a = build_tensors(r.prompt_ids, r.response_ids, 0, r.response_masks)
    b = build_tensors(r.prompt_ids, other, 0, r.response_masks)
    assert not torch.equal(a["responses"], b["responses"]) and torch.equal(a["response_mask"], b["response_mask"])
    mask = a["response_mask"]
    tool = mask == 0
    scores, turn_rewards = [1.0, 0.0, 0.5, 0.0], [[(3, 0.1)], [], [], [(3, -0.05)]]
    rewards = outcome_rewards(scores, mask, turn_rewards)
    last = [max(j for j, m in enumerate(row) if m) for row in r.response_masks]
    assert all(rewards[i, last[i]] == scores[i] for i in range(4)) and rewards[0, 3] == pytest.approx(0.1)
    assert not rewards[tool].any()
    torch.manual_seed(0)
    values = torch.randn(mask.shape)
    values_other = torch.where(tool, torch.randn(mask.shape) * 50, values)  # a critic's guesses on tool tokens
    for name in ADV_ESTIMATORS:
        fn = ADV_ESTIMATORS[name]
        kw = dict(values=values, reward_baselines=torch.zeros(4))
        adv, ret = fn(rewards, mask, r.index, AlgorithmConfig(), **kw)
        adv2, ret2 = fn(rewards, mask, r.index, AlgorithmConfig(), **{**kw, "values": values_other})
        assert torch.allclose(adv, adv2) and torch.allclose(ret * mask, ret2 * mask), name
        assert not adv[tool].any(), name
    # a reward after the tool turn reaches the tokens before it (REINFORCE++'s returns run over model tokens)
    _, returns = ADV_ESTIMATORS["reinforce_plus_plus"](rewards, mask, r.index, AlgorithmConfig())
    assert returns[0, 0] == pytest.approx(1.1) and returns[2, 0] == pytest.approx(0.5)
    # The per-token log-probs, entropies and reference log-probs the actor computes at tool positions take any
    # value when the tool's content changes: the masked loss and its gradient must not see them.
    base = {k: torch.randn(mask.shape) * 0.3 - 1.0 for k in ("log_prob", "old", "ref", "entropy")}
    noisy = {k: torch.where(tool, v - 5 + 10 * torch.rand(mask.shape), v) for k, v in base.items()}
    advantages = ADV_ESTIMATORS["grpo"](rewards, mask, r.index, AlgorithmConfig())[0]
    for loss_mode in ("vanilla", "gspo"):
        for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
            cfg = ActorConfig(loss_agg_mode=agg)
            results = []
            for t in (base, noisy):
                log_prob = t["log_prob"].clone().requires_grad_(True)
                loss, _ = get_policy_loss_fn(loss_mode)(t["old"], log_prob, advantages, mask, agg, cfg)
                loss = loss - 0.01 * agg_loss(t["entropy"] * log_prob, mask, agg)
                loss = loss + 0.1 * agg_loss(kl_penalty(log_prob, t["ref"], "low_var_kl"), mask, agg)
                loss.backward()
                results.append((loss.detach(), log_prob.grad))
            (l1, g1), (l2, g2) = results
            assert torch.allclose(l1, l2), (loss_mode, agg)
            assert torch.allclose(g1, g2) and not g1[tool].any(), (loss_mode, agg)


def test_a_prompt_that_fills_the_budget_gives_an_empty_response_not_an_error(tmp_path, tokenizer):
    engine = ScriptedEngine(tokenizer, [CALL])
    out = run_agent_loops([{"messages": MESSAGES, "prompt_ids": [], "uid": "u", "extra_info": {}}], 1,
                          cfg=_cfg(tmp_path), tokenizer=tokenizer, tools={}, generate_many=engine,
                          response_length=50, max_model_len=5)[0][0]
    assert out.response_ids == [] and engine.seen == []
