"""The floor plan (docs/architecture.md): every import of ours points down, never up or sideways.

Floors, lowest first: ground -> config -> registry | training (stages.train) -> serve -> stages -> pipeline.
The registry and training share a floor but never import each other; serving never imports training code.
Imports inside functions count too: a lazy import is still an arrow. Within a floor, files import each other
without a cycle (`cycles`): a cycle means two files that cannot be read, tested or moved apart, and an import order
that works only by luck. Imports under `if TYPE_CHECKING:` are annotations, not arrows.
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


def _annotation_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (never executed)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out.update(id(sub) for stmt in node.body for sub in ast.walk(stmt))
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the modules of ours it imports when it runs: `from a.b import c` points at the module a.b.c when
    there is one, else at a.b; a package's __init__ is a module like any other."""
    files = {module_name(path, root): path for package in PACKAGES for path in sorted((root / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {module: set() for module in files}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _annotation_only(tree)
        here = module.split(".")
        package = here if path.name == "__init__.py" else here[:-1]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                        if node.level else node.module)
                # `from pkg import mod` imports the module mod; pkg's __init__ has run long before (counting it
                # would tie every package's __init__ into a cycle with each child that imports a sibling this way)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            graph[module].update(t for t in targets if t in files and t != module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return found


def test_no_import_cycle_between_files():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("files, expected", [
    ({"registry/a.py": "from registry import b\n", "registry/b.py": "import registry.a\n"},
     [["registry.a", "registry.b"]]),
    ({"registry/a.py": "def f():\n    from registry.b import x\n", "registry/b.py": "from .a import f\n"},
     [["registry.a", "registry.b"]]),
    ({"registry/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from registry.b import X\n",
      "registry/b.py": "from registry.a import f\n"}, []),
    ({"stages/train/__init__.py": "from .recipe import run\n", "stages/train/recipe.py": "from .worker import w\n",
      "stages/train/worker.py": "from stages.train import run\n"},
     [["stages.train", "stages.train.recipe", "stages.train.worker"]]),
    ({"stages/train/__init__.py": "from .recipe import run\n", "stages/train/recipe.py": "from . import worker\n",
      "stages/train/worker.py": "import os\n"}, []),
])
def test_the_cycle_finder_finds_a_planted_cycle(tmp_path, files, expected):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "stages" / "train").mkdir()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert cycles(import_graph(tmp_path)) == expected


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
