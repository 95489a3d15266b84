"""Hermes-style tool calls (`multi_turn.format=hermes`): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

The format of Qwen2.5/3, SmolLM3 and NousResearch's Hermes models; vLLM's server parses the same with
`--tool-call-parser hermes`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: dict
    error: str = ""  # set when the call could not be parsed: the model reads it instead of a tool's answer


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>` block of `text`, in order; a malformed one becomes a ToolCall with `error` set."""
    calls = []
    for body in _CALL.findall(text):
        try:
            payload = json.loads(body.strip())
        except json.JSONDecodeError as exc:
            calls.append(ToolCall("", {}, f"Error: the tool call is not valid JSON ({exc.msg})."))
            continue
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            calls.append(ToolCall("", {}, 'Error: a tool call is {"name": ..., "arguments": {...}}.'))
            continue
        arguments = payload.get("arguments", {})
        if isinstance(arguments, str):  # some models send the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            calls.append(ToolCall(payload["name"], {}, "Error: the tool call's arguments must be an object."))
            continue
        calls.append(ToolCall(payload["name"], arguments))
    return calls
