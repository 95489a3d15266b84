"""Every setting does what it says: each leaf key of the schema is read by code, or refused by name.

A key that is accepted and then ignored is the worst kind of setting: a verl user's command line looks like it
worked. For every leaf of `config.schema.Config` one of these must hold:
- code outside `config/schema.py` reads it: an attribute (or `getattr`) of that name on something that names its
  section (`cfg.actor_rollout_ref.rollout.n`, `rollout.n` after `rollout = ...rollout`, `data_cfg.seed`, a
  parameter annotated with the section's class), or the whole section is dumped (`.model_dump()`, `.as_dict()`),
  or the dotted key is spelt out in a string (a lookup by name); config/loader.py counts, since a check there is
  the loader refusing values;
- the schema pins it to the one value we run (a `Literal` with a single value), so anything else is refused;
- it is on REFUSED_BY_SCHEMA below: the schema accepts only values that all run the same code (a validator or
  a `Literal` of synonyms), so there is nothing to read; the test checks that a value outside them is refused;
- it is on DESCRIPTIVE below, with the reason.
The walker is plain `ast`, like tests/test_floor_plan.py; `test_the_walker_finds_a_planted_key` shows it can fail.
"""

from __future__ import annotations

import ast
import json
import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from config.loader import load_config
from config.schema import Config, Section
from ground.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
READERS = ("ground", "config/loader.py", "registry", "stages", "serve", "pipeline")

# Keys that describe a run rather than change it, read by nothing on purpose. Keep this short; say why.
DESCRIPTIVE: dict[str, str] = {}

# key -> (a value the schema must refuse, why the values it accepts need no reader)
REFUSED_BY_SCHEMA: dict[str, tuple[object, str]] = {
    "actor_rollout_ref.actor.checkpoint.save_contents": (
        ["model"], "every checkpoint holds model, optimizer and extra; a resume needs all three"),
    "reward_model.reward_manager": (
        "prime", "naive and dapo name the one reward path here (score, then overlong shaping when enabled)"),
}


def leaf_keys(model: type[BaseModel], prefix: str = ""):
    """(dotted key, the section class that holds it) for every leaf of the schema."""
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from leaf_keys(field.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", model


def _pinned(section: type[BaseModel], leaf: str) -> bool:
    ann = section.model_fields[leaf].annotation
    return typing.get_origin(ann) is typing.Literal and len(typing.get_args(ann)) == 1


class _Reads:
    """What the code reads: (attribute, words naming its receiver), whole sections dumped, string literals."""

    def __init__(self, files):
        self.attributes: list[tuple[str, set[str]]] = []
        self.dumped: set[str] = set()
        self.strings: set[str] = set()
        for path in files:
            self._scan(ast.parse(path.read_text(), filename=str(path)))

    def _scan(self, tree: ast.AST) -> None:
        # What each plain name stands for, module-wide: what it was assigned, or its parameter annotation.
        origin: dict[str, list[str]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        origin.setdefault(target.id, []).append(ast.unparse(node.value))
            elif isinstance(node, ast.arg) and node.annotation is not None:
                origin.setdefault(node.arg, []).append(ast.unparse(node.annotation))

        def words(text: str, depth: int = 2) -> set[str]:
            out = set(re.findall(r"\w+", text))
            head = re.match(r"\w+", text)
            if depth and head:
                for source in origin.get(head.group(), []):
                    out |= words(source, depth - 1)
            return out

        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                receiver = ast.unparse(node.value)
                self.attributes.append((node.attr, words(receiver)))
                if node.attr in ("model_dump", "as_dict"):
                    self.dumped.add(receiver.rsplit(".", 1)[-1])
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                self.strings.add(node.value)
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) >= 2
                  and isinstance(node.args[1], ast.Constant)):
                self.attributes.append((node.args[1].value, words(ast.unparse(node.args[0]))))

    def reads(self, key: str, section: type[BaseModel]) -> bool:
        parts = key.split(".")
        leaf, parent = parts[-1], (parts[-2] if len(parts) > 1 else "")
        names = {section.__name__} | ({parent, f"{parent}_cfg", f"{parent}_config"} if parent else set())
        return (key in self.strings or parent in self.dumped
                or any(attr == leaf and receiver & names for attr, receiver in self.attributes))


def python_files(root: Path) -> list[Path]:
    out = []
    for entry in READERS:
        path = root / entry
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            out.extend(sorted(path.rglob("*.py")))
    return out


def unread_keys(root: Path = ROOT, schema: type[BaseModel] = Config) -> list[str]:
    reads = _Reads(python_files(root))
    return [key for key, section in leaf_keys(schema)
            if key not in DESCRIPTIVE and key not in REFUSED_BY_SCHEMA and not _pinned(section, key.rsplit(".", 1)[-1])
            and not reads.reads(key, section)]


def test_every_key_is_read_or_refused():
    assert unread_keys() == [], (
        "these config keys are accepted and read by nothing: honour them, pin them with a one-value Literal "
        "(refusing other values by name), or add them to DESCRIPTIVE with a reason")


def test_descriptive_keys_exist():
    keys = {key for key, _ in leaf_keys(Config)}
    assert set(DESCRIPTIVE) <= keys


@pytest.mark.parametrize("key", sorted(REFUSED_BY_SCHEMA))
def test_keys_refused_by_the_schema_refuse_other_values(key):
    bad, _ = REFUSED_BY_SCHEMA[key]
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(overrides=[f"{key}={json.dumps(bad)}"])


def test_the_walker_finds_a_planted_key(tmp_path):
    # The check must be able to fail: a schema with one new key, and a tree whose code reads it or does not.
    class Knobs(Section):
        used: int = 0
        unused: int = 0
        only_value: typing.Literal["sync"] = "sync"

    class Planted(Section):
        knobs: Knobs = Knobs()

    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "x.py").write_text("def f(cfg):\n    k = cfg.knobs\n    return k.used\n")
    assert unread_keys(tmp_path, Planted) == ["knobs.unused"]
    (tmp_path / "stages" / "y.py").write_text("def g(knobs_cfg):\n    return knobs_cfg.unused\n")
    assert unread_keys(tmp_path, Planted) == []
    # The same attribute name on an unrelated receiver does not count.
    (tmp_path / "stages" / "y.py").write_text("def g(other):\n    return other.unused\n")
    assert unread_keys(tmp_path, Planted) == ["knobs.unused"]
