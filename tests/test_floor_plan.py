"""The floor plan (docs/architecture.md): every import of ours points down, never up or sideways.

Floors, lowest first: ground -> config -> registry | training (stages.train) -> serve -> stages -> pipeline.
The registry and training share a floor but never import each other; serving never imports training code.
Imports inside functions count too: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ground", "config", "registry", "stages", "serve", "pipeline")


def floor_of(module: str) -> tuple[int, str] | None:
    """(floor number, unit name) of one of our modules; None for a third-party or standard module."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    if parts[0] == "stages":
        return (2, "training") if parts[1:2] == ["train"] else (4, "stages")
    return {"ground": (0, "ground"), "config": (1, "config"), "registry": (2, "registry"),
            "serve": (3, "serve"), "pipeline": (5, "pipeline")}[parts[0]]


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            else:
                found.append((node.lineno, node.module))
    return found


def arrows_up(root: Path = ROOT) -> list[str]:
    """Every import of ours in the packages under `root` that does not point down, as `file:line imports X (why)`."""
    bad = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            me = floor_of(module_name(path, root))
            for line, target in imports_of(path, root):
                them = floor_of(target)
                if them is None or them[1] == me[1]:
                    continue
                where = f"{path.relative_to(root)}:{line} imports {target}"
                if them[0] > me[0]:
                    bad.append(f"{where} (up: {me[1]} is below {them[1]})")
                elif them[0] == me[0]:
                    bad.append(f"{where} (sideways: {me[1]} and {them[1]} share a floor)")
                elif me[1] == "serve" and them[1] == "training":
                    bad.append(f"{where} (serving never imports training code)")
    return bad


def test_every_import_points_down():
    assert arrows_up() == []


@pytest.mark.parametrize("source, text, found", [
    ("ground/x.py", "from config import Config\n", "up"),
    ("stages/train/x.py", "def f():\n    import registry.core\n", "sideways"),
    ("serve/x.py", "from stages.train import rollout\n", "serving never imports training"),
    ("registry/x.py", "from . import core\nfrom ..pipeline import cli\n", "up"),
    ("pipeline/x.py", "import os\nfrom stages.train import rollout\n", None),
])
def test_the_walker_finds_a_planted_arrow(tmp_path, source, text, found):
    # The check itself must be able to fail: plant one file in an empty tree and look for what it reports.
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "stages" / "train").mkdir()
    (tmp_path / source).write_text(text)
    bad = arrows_up(tmp_path)
    if found is None:
        assert bad == []  # the top floor may import anything below it
    else:
        assert len(bad) == 1 and bad[0].startswith(source) and found in bad[0], bad
