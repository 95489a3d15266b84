"""What a published version records of its multi-turn rollouts: the tools (names, class, OpenAI schemas) and
the `multi_turn` settings it was trained with, so a server or an evaluation can give the adapter the same tools.
"""

from __future__ import annotations

from pathlib import Path

import yaml


def multi_turn_lineage(multi_turn) -> dict | None:
    """`multi_turn` (MultiTurnConfig) -> {settings, tools: [{name, class_name, schema}]}; None when it is off.

    The tool YAML is read again here, not from the file name alone: the file may change or vanish after the
    run, and the lineage must say which schemas the adapter learned to call.
    """
    if not multi_turn.enable:
        return None
    settings = multi_turn.model_dump()
    tools = []
    if multi_turn.tool_config_path:
        entries = yaml.safe_load(Path(multi_turn.tool_config_path).expanduser().read_text())["tools"]
        tools = [{"name": e["tool_schema"]["function"]["name"], "class_name": e["class_name"],
                  "schema": e["tool_schema"]} for e in entries]
    return {"settings": settings, "tools": tools}
