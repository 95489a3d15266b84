"""Tools for multi-turn rollouts, with verl's interface and YAML format (see base.py and loading.py)."""

from stages.train.tools.base import BaseTool, ToolResponse
from stages.train.tools.execution import ToolResult, run_tool_call
from stages.train.tools.hermes import ToolCall, parse_tool_calls
from stages.train.tools.loading import BUILTIN_TOOLS, load_tools

__all__ = ["BaseTool", "ToolResponse", "ToolResult", "run_tool_call", "ToolCall", "parse_tool_calls",
           "BUILTIN_TOOLS", "load_tools"]
