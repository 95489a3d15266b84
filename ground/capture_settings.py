"""The capture's settings checked without side effects: nothing imported, created or written.

Used twice: when the config loads (config/serve_schema.py: `serve.capture.*`, so a bad value stops the run
before training, not at the serve stage after it) and when `pipeline serve` starts (serve/capture.py, which
then also imports the hook and creates the folder). `source` names where the values came from in messages:
`--capture` (pipeline serve's flags: --capture, --capture-rate, ...) or `serve.capture` (the config's keys).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

CLI_SOURCE = "--capture"
CONFIG_SOURCE = "serve.capture"
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def setting_name(source: str, key: str) -> str:
    """`rate` from `--capture` is `--capture-rate`, from `serve.capture` it is `serve.capture.rate`; `dir` is the
    flag `--capture` itself."""
    if source.startswith("--"):
        return source if key == "dir" else f"{source}-{key.replace('_', '-')}"
    return f"{source}.{key}"


def hook_spec_problem(spec: str) -> str | None:
    """Why `spec` cannot name a redaction hook (`module:function`), or None. The module is looked up, not
    imported (importing runs the user's code): only its top-level package, since finding `a.b` imports `a`."""
    module_name, _, function_name = spec.partition(":")
    if not _DOTTED.fullmatch(module_name) or not function_name.isidentifier():
        return "must be `module:function` (a function from str to str)"
    try:
        found = importlib.util.find_spec(module_name.split(".")[0])
    except (ImportError, ValueError):
        found = None
    if found is None:
        return f"names module {module_name!r}, which is not importable here (is it on PYTHONPATH?)"
    return None


def folder_problem(path: str) -> str | None:
    """Why the capture folder `path` could not be created or written by this user, or None (the check creates
    nothing: the folder is made when the server starts)."""
    folder = Path(path).expanduser().absolute()
    if folder.exists():
        if not folder.is_dir():
            return f"{folder} exists and is not a folder"
        return None if os.access(folder, os.W_OK | os.X_OK) else f"{folder} is not writable by this user"
    ancestor = folder.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{folder} cannot be created: {ancestor} is not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{folder} cannot be created: {ancestor} is not writable by this user"
    return None
