"""verl's tool YAML (`actor_rollout_ref.rollout.multi_turn.tool_config_path`) -> tool objects by name.

    tools:
      - class_name: verl.tools.gsm8k_tool.Gsm8kTool     # a built-in name, a dotted module path, or file.py:Class
        config: {type: native, timeout: 5}
        tool_schema: {type: function, function: {name: calc_gsm8k_reward, description: ..., parameters: ...}}

Built-in classes answer to their verl path too, so verl's recipe YAMLs load unchanged.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from pathlib import Path

import yaml

from ground.errors import ConfigError
from stages.train.tools.base import BaseTool
from stages.train.tools.calculator import CalculatorTool
from stages.train.tools.gsm8k import Gsm8kTool

KEY = "actor_rollout_ref.rollout.multi_turn.tool_config_path"
BUILTIN_TOOLS: dict[str, type[BaseTool]] = {
    "calculator": CalculatorTool,
    "CalculatorTool": CalculatorTool,
    "stages.train.tools.calculator.CalculatorTool": CalculatorTool,
    "gsm8k": Gsm8kTool,
    "Gsm8kTool": Gsm8kTool,
    "verl.tools.gsm8k_tool.Gsm8kTool": Gsm8kTool,
    "stages.train.tools.gsm8k.Gsm8kTool": Gsm8kTool,
}


def _import_class(class_name: str, where: str) -> type:
    if class_name in BUILTIN_TOOLS:
        return BUILTIN_TOOLS[class_name]
    fix = (f"Use a built-in ({', '.join(sorted(BUILTIN_TOOLS))}), a dotted path `package.module.Class` on the "
           "Python path, or `path/to/file.py:Class`.")
    try:
        if ":" in class_name:  # a file, like custom_reward_function.path
            file, _, attr = class_name.rpartition(":")
            path = Path(file).expanduser().resolve()
            spec = importlib.util.spec_from_file_location(f"custom_tool_{path.stem}", path)
            if not path.is_file() or spec is None or spec.loader is None:
                raise ConfigError(f"{where}: class_name {class_name!r}: no Python file {file}. {fix}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module_name, _, attr = class_name.rpartition(".")
            if not module_name:
                raise ConfigError(f"{where}: class_name {class_name!r} is not a known tool. {fix}")
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{where}: class_name {class_name!r} failed to import: {type(exc).__name__}: {exc}. "
                          f"{fix}") from exc
    cls = getattr(module, attr, None)
    if not inspect.isclass(cls) or not callable(getattr(cls, "execute", None)):
        raise ConfigError(f"{where}: class_name {class_name!r} is not a tool class (a class with create, execute, "
                          f"calc_reward and release, e.g. a subclass of stages.train.tools.base.BaseTool). {fix}")
    return cls


def _check_schema(schema, where: str) -> dict:
    function = schema.get("function") if isinstance(schema, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ConfigError(f"{where}: tool_schema must be an OpenAI function schema "
                          f"{{type: function, function: {{name, description, parameters}}}}; got {schema!r:.200}.")
    return schema


def load_tools(path: str | None) -> dict[str, BaseTool]:
    """name -> tool, from the YAML at `path` (None: no tools). A ConfigError names the file, entry and fix."""
    if not path:
        return {}
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{KEY}={path!r}: no such file. Point it at a tool YAML (tools: [{{class_name, config, "
                          "tool_schema}}]), e.g. examples/tools/calculator_tool.yaml.")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{KEY}={path!r} is not valid YAML: {exc}") from None
    entries = data.get("tools") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{KEY}={path!r} must hold a non-empty list `tools:` of {{class_name, config, tool_schema}}.")
    tools: dict[str, BaseTool] = {}
    for i, entry in enumerate(entries):
        where = f"{KEY}={path!r}, tools[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("class_name"), str):
            raise ConfigError(f"{where}: each entry needs a class_name string; got {entry!r:.200}.")
        schema = _check_schema(entry.get("tool_schema"), where)
        config = entry.get("config") or {}
        if not isinstance(config, dict):
            raise ConfigError(f"{where}: config must be a mapping; got {config!r:.200}.")
        timeout = config.get("timeout", 10.0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigError(f"{where}: config.timeout={timeout!r} must be a positive number of seconds.")
        tool = _import_class(entry["class_name"], where)(config, schema)
        if tool.name in tools:
            raise ConfigError(f"{where}: a second tool named {tool.name!r}; tool names must be unique.")
        tools[tool.name] = tool
    return tools
