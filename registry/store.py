"""The storage interface behind the registry.

The registry (registry/core.py) decides *what* a version holds and validates it; a Store only knows how to keep
immutable numbered folders and a small alias table per adapter, atomically. The local filesystem store
(registry/local.py) is the embedded default; an object-store backend implements the same methods (numbering
with a conditional write instead of a file lock, `version_dir` returning a local cache of the objects).
"""

from __future__ import annotations

import abc
import contextlib
from pathlib import Path
from typing import Callable, Iterator


class Store(abc.ABC):
    """Immutable numbered versions and movable aliases, per adapter name. Names arrive validated."""

    uri: str

    # ---- reading (no locks: readers see a version whole or not at all)
    @abc.abstractmethod
    def list_adapters(self) -> list[str]:
        """Names that hold at least one version, sorted."""

    @abc.abstractmethod
    def version_numbers(self, name: str) -> list[int]:
        """Existing versions of `name`, ascending (empty when the adapter does not exist)."""

    @abc.abstractmethod
    def version_dir(self, name: str, version: int) -> Path | None:
        """A local folder holding the version's files, or None when the version does not exist."""

    @abc.abstractmethod
    def read_aliases(self, name: str) -> dict[str, int]:
        """alias -> version; a consistent snapshot even while another process moves an alias."""

    # ---- writing
    @abc.abstractmethod
    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """An empty private folder to build a version in; removed on exit unless it was committed."""

    @abc.abstractmethod
    def commit(self, name: str, staged: Path, finish: Callable[[Path, int], None],
               after: Callable[[int], None] | None = None) -> int:
        """Give `staged` the next version number of `name` and make it visible in one atomic step.

        `finish(staged, version)` runs once the number is known, before the version becomes visible (it writes
        the files that carry the number). `after(version)` runs while the numbering is still held, so that
        mirrors can register versions in the same order. Returns the version number.
        """

    @abc.abstractmethod
    def update_aliases(self, name: str, change: Callable[[dict[str, int]], dict[str, int]]) -> dict[str, int]:
        """Atomically replace the alias table with `change(current)`; returns the new table."""

    @abc.abstractmethod
    def remove_version(self, name: str, version: int, check: Callable[[dict[str, int]], dict[str, int]]) -> None:
        """Remove a version; `check(aliases)` runs under the adapter's lock, raises to refuse, returns new aliases."""

    @abc.abstractmethod
    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Exclusive access to `name`'s numbering and aliases (re-entrant within one process)."""

    def cleanup(self) -> int:
        """Remove leftovers of writers that died; returns how many. Optional for backends without leftovers."""
        return 0
