"""Agent loops: how one sample of a prompt is rolled out, registered by name as in verl (`@register("tool_agent")`).

A loop's async `run(sampling, **item)` returns an `AgentLoopOutput`: prompt ids, response ids, a response mask
(1 on tokens the model sampled, 0 on tool and template tokens, which are never trained on), the engine's
log-probs (0 under mask 0), per-turn rewards and counts. A row's `agent_name` column picks its loop, else
`actor_rollout_ref.rollout.agent.default_agent_loop`, else tool_agent when multi_turn.enable, else single_turn.

All samples of a batch run as asyncio tasks; `BatchingEngine` turns their generate calls into one engine call
whenever every live sample is waiting on the engine (turn-synchronous batching: a sample that runs a tool holds
the next engine call back until its tool answers, which is milliseconds against seconds of decoding).
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass, field
from typing import Callable

from ground.errors import ConfigError, DataError
from ground.names import NameRegistry
from stages.train.chat_turns import ChatTurns
from stages.train.tools import load_tools, parse_tool_calls, run_tool_call

AGENT_LOOPS: NameRegistry[type] = NameRegistry("agent loop")
DEFAULT_KEY = "actor_rollout_ref.rollout.agent.default_agent_loop"


def register(name: str, aliases: tuple[str, ...] = ()):
    """Class decorator: `@register("tool_agent")` makes the loop selectable by a row's agent_name."""
    return AGENT_LOOPS.register(name, aliases)


@dataclass
class AgentLoopOutput:
    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[int]
    response_logprobs: list[float]
    finish_reason: str = ""
    num_turns: int = 2  # user + assistant (+ one per further assistant or tool turn), as verl counts
    turn_rewards: list[tuple[int, float]] = field(default_factory=list)  # (response position, tool step reward)
    tool_calls: int = 0
    tool_errors: int = 0
    messages: list[dict] = field(default_factory=list)
    # each tool's final `calc_reward` for the sample, by tool name; the reward function reads it as
    # extra_info["rollout_reward_scores"] (verl's key; verl does not add it to the score by itself)
    tool_rewards: dict[str, float] = field(default_factory=dict)


@dataclass
class LoopContext:
    """What every loop of a run shares."""

    tokenizer: object
    engine: "BatchingEngine"
    response_length: int
    max_model_len: int
    multi_turn: object  # MultiTurnConfig
    tools: dict = field(default_factory=dict)
    turns: ChatTurns | None = None


class AgentLoopBase:
    def __init__(self, ctx: LoopContext):
        self.ctx = ctx

    def budget(self, used: int) -> int:
        """Tokens the next generate call may produce: within the response length and the model length."""
        return min(self.ctx.response_length - (used - self.prompt_len), self.ctx.max_model_len - 1 - used)

    async def run(self, sampling: dict, **item) -> AgentLoopOutput:
        raise NotImplementedError


@register("single_turn", aliases=("single_turn_agent",))
class SingleTurnAgentLoop(AgentLoopBase):
    """One prompt, one response: today's single-turn rollout."""

    async def run(self, sampling: dict, **item) -> AgentLoopOutput:
        prompt = list(item["prompt_ids"])
        self.prompt_len = len(prompt)
        out = await self.ctx.engine.generate(prompt, self.budget(len(prompt)))
        ids = list(out["token_ids"])
        return AgentLoopOutput(prompt, ids, [1] * len(ids), list(out.get("logprobs") or [0.0] * len(ids)),
                               out.get("finish_reason", ""))


def _truncate(text: str, limit: int, side: str) -> str:
    if len(text) <= limit:
        return text
    if side == "left":
        return "(truncated)..." + text[-limit:]
    if side == "right":
        return text[:limit] + "...(truncated)"
    half = limit // 2
    return text[:half] + "...(truncated)..." + text[len(text) - (limit - half):]


async def _maybe_await(value):
    return await value if inspect.isawaitable(value) else value


@register("tool_agent")
class ToolAgentLoop(AgentLoopBase):
    """Generate; run the hermes tool calls of the turn; append the tool turn's tokens; generate again; ..."""

    def tool_calls_of(self, text: str, ended: bool) -> list:
        """The calls of a turn the model ended itself (a turn cut by the length budget ends the sample)."""
        return parse_tool_calls(text) if ended else []

    async def run(self, sampling: dict, **item) -> AgentLoopOutput:
        ctx, turns = self.ctx, self.ctx.turns
        mt = self.ctx.multi_turn  # MultiTurnConfig
        messages = [dict(m) for m in item["messages"]]
        prompt = turns.prompt_ids(messages)
        self.prompt_len = len(prompt)
        kwargs_by_tool = (item.get("extra_info") or {}).get("tools_kwargs") or {}
        instance_ids = {}
        for name, tool in ctx.tools.items():  # one instance per sample, with the row's create_kwargs (verl)
            create_kwargs = (kwargs_by_tool.get(name) or {}).get("create_kwargs", {})
            instance_ids[name] = await _maybe_await(tool.create(**create_kwargs))
        out = AgentLoopOutput(prompt, [], [], [], num_turns=1, messages=messages)
        assistant_turns = user_turns = 0
        try:
            while True:
                budget = self.budget(len(prompt) + len(out.response_ids))
                if budget <= 0:
                    break
                gen = await ctx.engine.generate(prompt + out.response_ids, budget)
                ids = list(gen["token_ids"])
                out.response_ids += ids
                out.response_mask += [1] * len(ids)
                out.response_logprobs += list(gen.get("logprobs") or [0.0] * len(ids))
                out.finish_reason = gen.get("finish_reason", "")
                assistant_turns += 1
                out.num_turns += 1
                ended = bool(ids) and ids[-1] == turns.eos_id
                text = turns.tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=False,
                                              clean_up_tokenization_spaces=False)
                messages.append({"role": "assistant", "content": text})
                if mt.max_assistant_turns and assistant_turns >= mt.max_assistant_turns:
                    break
                calls = self.tool_calls_of(text, ended)[: mt.max_parallel_calls]
                if not calls or (mt.max_user_turns and user_turns >= mt.max_user_turns):
                    break
                results = await asyncio.gather(*(run_tool_call(ctx.tools, instance_ids, c) for c in calls))
                out.tool_calls += len(calls)
                out.tool_errors += sum(r.error for r in results)
                step_reward = sum(r.reward for r in results)
                if step_reward:  # on the turn's last model token
                    out.turn_rewards.append((len(out.response_ids) - 1, step_reward))
                tool_messages = [{"role": "tool", "content": _truncate(r.text, mt.max_tool_response_length,
                                                                        mt.tool_response_truncate_side)}
                                 for r in results]
                # a turn a subclass continues past the length cut is closed as the template closes it
                tool_ids = ([] if ended else [turns.eos_id]) + turns.tool_turn_ids(tool_messages)
                # room for the tool turn and at least one more model token, or stop here (as verl)
                if self.budget(len(prompt) + len(out.response_ids) + len(tool_ids)) <= 0:
                    break
                out.response_ids += tool_ids
                out.response_mask += [0] * len(tool_ids)
                out.response_logprobs += [0.0] * len(tool_ids)
                messages.extend(tool_messages)
                user_turns += 1
                out.num_turns += 1
            for name, tool in ctx.tools.items():  # verl: calc_reward once the sample ends, then release
                calc_kwargs = (kwargs_by_tool.get(name) or {}).get("calc_reward_kwargs", {})
                out.tool_rewards[name] = float(await _maybe_await(tool.calc_reward(instance_ids[name], **calc_kwargs)))
        finally:
            for name, tool in ctx.tools.items():
                release_kwargs = (kwargs_by_tool.get(name) or {}).get("release_kwargs", {})
                await _maybe_await(tool.release(instance_ids[name], **release_kwargs))
        turns.check(messages, prompt + out.response_ids, mt.tokenization_sanity_check_mode)
        return out


# ------------------------------------------------------------------------------------------------ batching
class BatchingEngine:
    """`await generate(ids, max_tokens)` for many samples at once -> one `generate_many` call per turn."""

    def __init__(self, generate_many: Callable[[list[list[int]], list[int]], list[dict]]):
        self.generate_many = generate_many
        self.pending: list[tuple[list[int], int, asyncio.Future]] = []
        self.live = 0
        self.calls = 0

    async def generate(self, ids: list[int], max_tokens: int) -> dict:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((list(ids), int(max_tokens), future))
        self._flush_when_all_wait()
        return await future

    def done(self) -> None:
        self.live -= 1
        self._flush_when_all_wait()

    def _flush_when_all_wait(self) -> None:
        if not self.pending or len(self.pending) < self.live:
            return
        batch, self.pending = self.pending, []
        self.calls += 1
        try:
            outs = self.generate_many([ids for ids, _, _ in batch], [mt for _, mt, _ in batch])
        except Exception as exc:  # every waiting sample fails with the engine's error
            for _, _, future in batch:
                if not future.done():  # a sample cancelled meanwhile (another one failed) takes nothing
                    future.set_exception(exc)
            return
        for (_, _, future), out in zip(batch, outs):
            if not future.done():
                future.set_result(out)


def agent_name_of(item: dict, default: str) -> str:
    return item.get("agent_name") or default


def default_agent_name(cfg) -> str:
    rollout = cfg.actor_rollout_ref.rollout
    name = rollout.agent.default_agent_loop or ("tool_agent" if rollout.multi_turn.enable else "single_turn")
    return AGENT_LOOPS.canonical(name, DEFAULT_KEY)


def check_items(items: list[dict], default: str, where: str) -> None:
    """Every row's agent_name names a registered loop (checked before the first step)."""
    for item in items:
        name = item.get("agent_name")
        if name and name not in AGENT_LOOPS:
            raise DataError(f"{where}: a row has agent_name={name!r}, which is no agent loop; valid: "
                            f"{', '.join([*AGENT_LOOPS, *AGENT_LOOPS.aliases])}. Fix the data's agent_name column "
                            f"or leave it empty to use {default}.")


def check_config(cfg) -> None:
    """Load-time: the raw chat the tool agent needs, the default loop's name, and the tool YAML."""
    if cfg.actor_rollout_ref.rollout.multi_turn.enable and not cfg.data.return_raw_chat:
        raise ConfigError(
            "actor_rollout_ref.rollout.multi_turn.enable=True needs data.return_raw_chat=True (as in verl): the "
            "tool agent renders each row's chat messages with the tool schemas itself. Set data.return_raw_chat=True."
        )
    default_agent_name(cfg)
    load_tools(cfg.actor_rollout_ref.rollout.multi_turn.tool_config_path)


def uses_agent_loops(cfg, items: list[dict]) -> bool:
    """Whether a batch needs the agent-loop path; single-turn rows alone keep the plain engine call."""
    default = default_agent_name(cfg)
    return any(AGENT_LOOPS.canonical(agent_name_of(it, default), "agent_name") != "single_turn" for it in items)


def run_agent_loops(items: list[dict], n: int, *, cfg, tokenizer, tools: dict, generate_many, response_length: int,
                    max_model_len: int) -> list[list[AgentLoopOutput]]:
    """n samples of each item through its agent loop; outputs grouped per item, in order."""
    engine = BatchingEngine(generate_many)
    schemas = [tool.get_openai_tool_schema() for tool in tools.values()]
    ctx = LoopContext(tokenizer, engine, response_length, max_model_len, cfg.actor_rollout_ref.rollout.multi_turn,
                      tools, ChatTurns(tokenizer, schemas))
    default = default_agent_name(cfg)

    async def one(item: dict) -> AgentLoopOutput:
        try:
            loop = AGENT_LOOPS[AGENT_LOOPS.canonical(agent_name_of(item, default), "agent_name")](ctx)
            return await loop.run({}, **item)
        finally:
            engine.done()

    async def all_samples() -> list[AgentLoopOutput]:
        engine.live = len(items) * n
        return await asyncio.gather(*(one(item) for item in items for _ in range(n)))

    flat = asyncio.run(all_samples())
    return [flat[i * n:(i + 1) * n] for i in range(len(items))]
