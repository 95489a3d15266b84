"""Retention: which old versions of an adapter can go (`pipeline registry gc NAME --keep-last N`).

A plan only; Registry.gc deletes it under the adapter's lock. What is kept and why:
- the newest `keep_last` versions;
- every version an alias points at (serving `NAME@prod` must not break);
- every version the route sends traffic to or mirrors to, by number (an alias target is kept as an alias);
- every version named as the parent (`parent_version`, `NAME@N` or N) of a kept version, and its parent, and
  so on, unless `drop_parents`: a lineage that says "trained from NAME@3" should still find NAME@3.
"""

from __future__ import annotations

from ground.errors import RegistryError
from registry.refs import VERSION_RE, parse_ref
from registry.routes import Route


def parent_of(name: str, metadata: dict) -> int | None:
    """The version of `name` this version was trained from (None: none recorded, or another adapter's)."""
    parent = metadata.get("parent_version")
    if parent is None or isinstance(parent, bool):
        return None
    if isinstance(parent, int):
        return parent
    text = str(parent)
    if VERSION_RE.fullmatch(text):
        return int(text)
    try:
        parent_name, version, _ = parse_ref(text)
    except RegistryError:
        return None
    return version if parent_name == name else None


def plan_gc(name: str, versions: dict[int, dict], aliases: dict[str, int], route: Route | None, keep_last: int,
            drop_parents: bool = False) -> list[int]:
    """Versions (ascending) to delete: `versions` maps every existing number to its metadata."""
    newest = sorted(versions, reverse=True)
    keep = set(newest[:keep_last]) | set(aliases.values())
    if route is not None:
        for target in [t for t, _ in route.targets] + ([route.mirror] if route.mirror else []):
            if VERSION_RE.fullmatch(target):
                keep.add(int(target))
            elif target in aliases:
                keep.add(aliases[target])
    if not drop_parents:
        todo = list(keep)
        while todo:
            parent = parent_of(name, versions.get(todo.pop(), {}))
            if parent is not None and parent in versions and parent not in keep:
                keep.add(parent)
                todo.append(parent)
    return sorted(v for v in versions if v not in keep)
