"""The tool interface, as verl's (`verl.tools.base_tool.BaseTool`): one class per tool, one instance per sample.

A rollout calls `create` when a sample starts (with the row's `tools_kwargs[<tool name>].create_kwargs`),
`execute` for each call the model makes (returns the text the model reads, a step reward and metrics),
`calc_reward` for a final tool reward, and `release` when the sample ends. Every method may be sync or async.
The OpenAI function schema (`tool_schema`) is what the chat template shows the model.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any


@dataclass
class ToolResponse:
    """What a tool answers; only text is supported (verl's also has image and video)."""

    text: str = ""


class BaseTool:
    """Subclass and override `execute` (and `create`/`calc_reward`/`release` when the tool keeps state)."""

    def __init__(self, config: dict, tool_schema: dict):
        self.config = dict(config or {})
        self.tool_schema = tool_schema
        self.name = tool_schema["function"]["name"]
        self.timeout = float(self.config.get("timeout", 10.0))  # seconds per execute call

    def get_openai_tool_schema(self) -> dict:
        return self.tool_schema

    async def create(self, instance_id: str | None = None, **kwargs) -> str:
        return instance_id or str(uuid.uuid4())

    async def execute(self, instance_id: str, parameters: dict[str, Any], **kwargs) -> tuple[Any, float, dict]:
        raise NotImplementedError(f"tool {self.name!r} does not implement execute")

    async def calc_reward(self, instance_id: str, **kwargs) -> float:
        return 0.0

    async def release(self, instance_id: str, **kwargs) -> None:
        return None
