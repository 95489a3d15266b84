"""`actor_rollout_ref.rollout.multi_turn` and `.agent`: verl's keys for multi-turn, tool-using rollouts.

What they drive lives in stages/train/agent_loops.py and stages/train/tools/; cross-key checks (a tool YAML
that loads, an agent loop name that exists) run where those registries are, before a run starts.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field

from config.section import Section


class MultiTurnConfig(Section):
    enable: bool = False  # rows default to the tool_agent loop (a row's agent_name column still wins)
    tool_config_path: Optional[str] = None  # verl's tool YAML: tools: [{class_name, config, tool_schema}]
    max_assistant_turns: Optional[int] = Field(default=None, ge=1)  # None: as many as the response length allows
    max_user_turns: Optional[int] = Field(default=None, ge=1)  # tool-response turns; None: no limit beyond the length
    max_parallel_calls: int = Field(default=1, ge=1)  # tool calls executed per assistant turn; later ones are dropped
    # characters of a tool's answer kept (verl cuts text, not tokens)
    max_tool_response_length: int = Field(default=256, ge=1)
    tool_response_truncate_side: Literal["left", "middle", "right"] = "middle"
    format: Literal["hermes"] = "hermes"  # <tool_call>{"name": ..., "arguments": ...}</tool_call>
    # strict: the loop's ids must decode to the chat template's rendering of the final messages (first
    # difference named); ignore_strippable: whitespace-only differences pass; disable: no check.
    tokenization_sanity_check_mode: Literal["strict", "ignore_strippable", "disable"] = "strict"

    REFUSED_VERL_KEYS: ClassVar[dict[str, str]] = {
        "interaction_config_path": "simulated users (verl's interactions) are not implemented; tool turns are",
        "use_inference_chat_template": "the loop always uses the model's own chat template, token-in/token-out",
        "completion_callback": "verl's sglang completion callbacks are not implemented",
    }


class AgentConfig(Section):
    # The agent loop of a row without an `agent_name` column; None: tool_agent when multi_turn.enable, else
    # single_turn (verl's single_turn_agent is accepted as a name too).
    default_agent_loop: Optional[str] = None

    REFUSED_VERL_KEYS: ClassVar[dict[str, str]] = {
        "num_workers": "the agent loops run as asyncio tasks on the trainer's driver; there is no worker pool",
        "agent_loop_config_path": "agent loops are registered in code (stages/train/agent_loops.py)",
        "custom_async_server": "generation goes to the trainer's vLLM rollout engine",
    }
