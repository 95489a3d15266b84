"""Registries of named components (advantage estimators, policy losses, KL estimators, reward scorers, ...).

A `NameRegistry` is a read-only mapping from a name to what was registered under it. Registering a name
twice is an error (two components silently shadowing each other is a bug), aliases resolve to their canonical
name, and a failed lookup is a ConfigError that names the config key, the bad value and every valid name.
"""

from __future__ import annotations

import difflib

from collections.abc import Mapping
from typing import Callable, Generic, Iterator, TypeVar

from ground.errors import ConfigError

T = TypeVar("T")


class NameRegistry(Mapping, Generic[T]):
    """name -> component. Iterating yields canonical names; `in` and lookups also accept aliases."""

    def __init__(self, kind: str):
        self.kind = kind  # "advantage estimator", "policy loss", ... (used in error messages)
        self._items: dict[str, T] = {}
        self.aliases: dict[str, str] = {}  # alias -> canonical name

    def add(self, name: str, item: T, aliases: tuple[str, ...] = ()) -> T:
        for key in (name, *aliases):
            if key in self:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
        self._items[name] = item
        self.aliases.update({alias: name for alias in aliases})
        return item

    def register(self, name: str, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Decorator: `@REG.register("grpo")` registers the function under its name and returns it unchanged."""
        return lambda item: self.add(name, item, aliases)

    def canonical(self, name: str, key: str, extra_valid: tuple[str, ...] = ()) -> str:
        """The canonical name for `name`, or a ConfigError naming the config `key` and the valid names."""
        if name in self:
            return self.aliases.get(name, name)
        valid = [*self._items, *self.aliases, *extra_valid]
        close = difflib.get_close_matches(str(name), valid, n=1)
        hint = f" Did you mean {key}={close[0]}?" if close else ""
        raise ConfigError(f"{key}={name!r}: no {self.kind} has that name; valid: {', '.join(valid)}.{hint}")

    def lookup(self, name: str, key: str) -> T:
        return self._items[self.canonical(name, key)]

    def __getitem__(self, name: str) -> T:
        return self._items[self.aliases.get(name, name)]

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self.aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
