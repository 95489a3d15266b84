"""vLLM's tool-call parsers by name: which names the installed vLLM knows, and the server flags that turn one on.

With a parser, vLLM's chat endpoint reads the model's calls (hermes `<tool_call>{...}</tool_call>`, Llama JSON, ...)
out of its text into `tool_calls`, and serves `tool_choice="auto"`, which it refuses without one. The names come
from vLLM's own registry (`ToolParserManager`), so a vLLM upgrade that adds or drops a parser needs no change here.
"""

from __future__ import annotations

from ground.errors import ConfigError

AUTO_TOOL_CHOICE_FLAG = "--enable-auto-tool-choice"


def known_tool_parsers() -> list[str]:
    """The parser names of the installed vLLM (imported on first use: it loads torch)."""
    from vllm.tool_parsers import ToolParserManager

    return ToolParserManager.list_registered()


def unknown_tool_parser(name: str) -> str | None:
    """Why `name` is not a parser of the installed vLLM, listing those it knows; None when it is one."""
    known = known_tool_parsers()
    if name in known:
        return None
    return (f"vLLM has no tool-call parser {name!r}; it knows: {', '.join(known)}. Pick the one for the model's "
            f"call format (`hermes` for the `<tool_call>` format that multi_turn.format=hermes trains)")


def tool_parser_args(name: str | None, source: str) -> list[str]:
    """vLLM's server flags for the parser `name` (none for None); an unknown name is refused, naming `source`."""
    if name is None:
        return []
    problem = unknown_tool_parser(name)
    if problem:
        raise ConfigError(f"{problem} (from {source}).")
    return [AUTO_TOOL_CHOICE_FLAG, "--tool-call-parser", name]
