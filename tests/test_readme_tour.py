"""The README's CLI tour names every command the `pipeline` CLI defines, and nothing it does not.

The tour is the block under "## A tour of the CLI": each line starting with `pipeline` names a command path,
and `|` separates further commands of the same group (`pipeline registry list | show REF | alias set ...`).
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from pipeline.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def cli_commands(group: click.Group = main, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every command path that runs something (groups are walked, not listed, unless they run on their own:
    `pipeline serve` serves, `pipeline serve status` reads a server)."""
    out = set()
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            out |= cli_commands(command, prefix + (name,))
            if command.invoke_without_command:
                out.add(prefix + (name,))
        else:
            out.add(prefix + (name,))
    return out


def _descend(words: list[str], group: click.Group, prefix: tuple[str, ...]) -> tuple[tuple[str, ...], click.Group]:
    """The longest command path that `words` start with, below `group`; and the group it ends in."""
    path, here = prefix, group
    for word in words:
        sub = here.commands.get(word) if isinstance(here, click.Group) else None
        if sub is None:
            break
        path, here = path + (word,), sub
    return path, here


def tour_commands(text: str) -> set[tuple[str, ...]]:
    """The command paths the tour block in `text` names (unknown words end a path: they are arguments)."""
    block = re.search(r"## A tour of the CLI\s+```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no '## A tour of the CLI' bash block"
    found = set()
    for line in block.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("pipeline "):
            continue
        first, *more = [part.split() for part in line.split(" | ")]
        path, last = _descend(first[1:], main, ())
        found.add(path)
        group_prefix = path[:-1] if not isinstance(last, click.Group) else path
        group = main
        for word in group_prefix:
            group = group.commands[word]
        for words in more:
            sub_path, _ = _descend(words, group, group_prefix)
            found.add(sub_path)
    return found


def test_the_tour_names_every_command_and_no_other():
    named, defined = tour_commands(README.read_text()), cli_commands()
    assert sorted(defined - named) == [], "commands missing from the README's tour"
    assert sorted(named - defined) == [], "the README's tour names commands the CLI does not define"


@pytest.mark.parametrize("tour, missing", [
    ("pipeline registry list | alias set NAME A V\n", ("registry", "alias", "delete")),
    ("pipeline registry alias set NAME A V | delete NAME A\n", ("registry", "list")),
])
def test_a_missing_command_is_found(tour, missing):
    named = tour_commands(f"## A tour of the CLI\n\n```bash\n{tour}```\n")
    assert missing not in named and missing in cli_commands()
