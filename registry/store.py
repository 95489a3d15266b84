"""The storage interface behind the registry.

The registry (registry/core.py) decides *what* a version holds and validates it; a Store only knows how to keep
immutable numbered folders and a small alias table per adapter, atomically. The local filesystem store
(registry/local.py) is the embedded default; the MLflow store (registry/mlflow_store.py) keeps versions on an
MLflow tracking server, numbers them with the server's Model Registry and hands out folders from a verified
local cache (registry/cache.py).
"""

from __future__ import annotations

import abc
import contextlib
import json
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

    def resolve_alias(self, name: str, alias: str) -> int | None:
        """The version `alias` points at now (None when it does not exist); per request, so keep it cheap."""
        return self.read_aliases(name).get(alias)

    def latest_version(self, name: str) -> int | None:
        """The highest existing version (None when there is none)."""
        return max(self.version_numbers(name), default=None)

    def open_version(self, name: str, version: int) -> tuple[dict, Callable[[], Path]] | None:
        """(metadata.json's content, a function giving the local folder), or None when the version does not exist.

        A remote store answers from what it already knows and downloads the files only when the folder is asked
        for, so that listing 1,000 versions does not fetch 1,000 adapters. Raises RegistryError when the metadata
        is unreadable.
        """
        from ground.errors import RegistryError
        from registry.integrity import METADATA, read_regular

        path = self.version_dir(name, version)
        if path is None:
            return None
        try:  # only a regular file: a FIFO planted here would block the reader (a server request) forever
            metadata = json.loads(read_regular(path / METADATA, f"{name}@{version}"))
        except (OSError, ValueError) as exc:
            raise RegistryError(f"`{name}@{version}` has an unreadable metadata.json ({exc}); run "
                                f"`pipeline registry verify {name}@{version}`.") from None
        return metadata, lambda: path

    def list_versions(self, name: str) -> list[tuple[int, dict, Callable[[], Path]]]:
        """(version, metadata, folder getter) of every version, ascending; versions deleted meanwhile skipped."""
        out = []
        for v in self.version_numbers(name):
            found = self.open_version(name, v)
            if found is not None:
                out.append((v, *found))
        return out

    def verify_version(self, ref: str, name: str, version: int) -> list[str]:
        """Recompute the version's hashes where it is stored; one line per problem."""
        from registry.integrity import verify_folder

        path = self.version_dir(name, version)
        return verify_folder(ref, path) if path is not None else [f"{ref} does not exist"]

    # ---- writing
    @abc.abstractmethod
    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """An empty private folder to build a version in; removed on exit unless it was committed."""

    @abc.abstractmethod
    def commit(self, name: str, staged: Path, finish: Callable[[Path, int | None], None],
               after: Callable[[int], None] | None = None, expect_version: int | None = None) -> int:
        """Give `staged` the next version number of `name` and make it visible in one atomic step.

        `finish(staged, version)` runs before the version becomes visible and writes metadata.json and the
        manifest; a store that learns the number only at the visible step (MLflow's registry) passes None, and
        the number then lives in the store rather than in metadata.json. `after(version)` runs once the version
        is visible (for a local store, while its numbering is still held, so that mirrors register versions in
        the same order). `expect_version`: refuse (RegistryError) unless the new version gets exactly this
        number (copying between stores keeps numbers). Returns the version number.
        """

    def retire_numbers(self, name: str, upto: int) -> None:
        """Make sure the next version of `name` is numbered above `upto` (numbers of deleted versions, when a
        copy recreates a history with gaps). Stores that cannot do this raise RegistryError."""
        from ground.errors import RegistryError

        raise RegistryError(f"{self.uri} cannot reserve version numbers; copy into an empty adapter instead.")

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

    # ---- routes and history (registry/routes.py, registry/history.py)
    @abc.abstractmethod
    def read_route(self, name: str) -> dict | None:
        """The stored route record (`Route.to_dict()`), None when `name` never had one; cheap (servers poll it)."""

    @abc.abstractmethod
    def write_route(self, name: str, record: dict) -> None:
        """Replace the route record in one atomic step; the caller holds `locked(name)`."""

    @abc.abstractmethod
    def append_event(self, name: str, event_json: str) -> None:
        """Add one history event (a JSON object's text); never rewrites an earlier one, and concurrent writers
        lose none."""

    @abc.abstractmethod
    def read_events(self, name: str) -> list[dict]:
        """Every history event of `name`, oldest first."""

    def cleanup(self, max_age_s: float | None = None) -> list[str]:
        """Remove leftovers of writers that died (or, with `max_age_s`, any older than that); returns one line per
        leftover removed. Optional for backends without leftovers."""
        return []
