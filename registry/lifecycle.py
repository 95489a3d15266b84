"""Routes, history, rollback and retention on the Registry (mixed into registry.core.Registry).

Every change here happens under the adapter's lock (`Store.locked`) and leaves one history event, so
`pipeline registry history NAME` tells who moved what, when, why and on what figures.
"""

from __future__ import annotations

import time

from ground.errors import NotFoundError, RegistryError
from registry.history import Event, new_event
from registry.refs import VERSION_RE, check_alias, check_name, format_versions
from registry.routes import Route, check_weights


class Lifecycle:
    """Uses the Registry's `store`, `_no_adapter`, `_alias_text`, `set_alias`, `list_versions`, `delete_version`."""

    # ------------------------------------------------------------------------------------------- history
    def history(self, name: str) -> list[Event]:
        """Every recorded alias move, route change, promotion and rollback of `name`, oldest first."""
        events = [Event.from_dict(d) for d in self.store.read_events(check_name(name)) if isinstance(d, dict)]
        if not events and self.store.latest_version(name) is None:
            raise self._no_adapter(name)  # a misspelt name says so instead of showing an empty history
        return events

    def record_event(self, name: str, kind: str, *, before, after, reason: str = "",
                     figures: dict | None = None) -> Event:
        """Append one event (e.g. a promotion's gate figures) to `name`'s history."""
        check_name(name)
        event = new_event(name, kind, before=before, after=after, reason=reason, figures=figures)
        if self.store.latest_version(name) is None:
            raise self._no_adapter(name)
        self.store.append_event(name, event.to_json())
        return event

    # ------------------------------------------------------------------------------------------- routes
    def get_route(self, name: str) -> Route | None:
        """The traffic split of bare `name`, or None (bare `name` is then the latest version)."""
        record = self.store.read_route(check_name(name))
        return Route.from_dict(name, record) if record else None

    def _route_now(self, name: str) -> tuple[Route | None, int]:
        """(current route, its revision) for a writer; a corrupted record counts as none, so it can be replaced."""
        record = self.store.read_route(name)
        if not record:
            return None, 0
        try:
            return Route.from_dict(name, record), int(record.get("revision") or 0)
        except (RegistryError, AttributeError, TypeError, ValueError):
            return None, 0

    def _check_target(self, name: str, target: str, what: str, aliases: dict[str, int], versions: list[int]) -> int:
        """The version a route target or mirror points at now; refuses one that resolves to nothing."""
        version = int(target) if VERSION_RE.fullmatch(target) else aliases.get(target)
        if version is None or version not in versions:
            alias_text = ", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
            raise NotFoundError(f"{what} `{target}` of `{name}` is neither an alias of it nor one of its versions "
                                f"(aliases: {alias_text}; versions: {format_versions(versions)}). Point the alias "
                                f"first (`pipeline registry alias set {name} {target} VERSION`) or name an existing "
                                "version.")
        return version

    def set_route(self, name: str, targets: dict[str, int], *, mirror: str | None = None, reason: str = "",
                  kind: str = "route_set", figures: dict | None = None) -> Route:
        """Send bare `name` to weighted targets (aliases or version numbers as strings; integer weights summing
        to 100), optionally shadowed by `mirror`. Atomic; recorded in the history as an event of `kind`."""
        check_name(name)
        pairs = check_weights(name, targets)
        if mirror is not None:
            mirror = str(mirror)
        with self.store.locked(name):
            versions = self.store.version_numbers(name)
            if not versions:
                raise self._no_adapter(name)
            aliases = self.store.read_aliases(name)
            for target, _ in pairs:
                self._check_target(name, target, "Route target", aliases, versions)
            if mirror is not None:
                self._check_target(name, mirror, "Mirror", aliases, versions)
            old, revision = self._route_now(name)
            route = Route(name, pairs, mirror, revision + 1, time.time())
            event = new_event(name, kind, before=old.to_dict() if old else None, after=route.to_dict(),
                              reason=reason, figures=figures)
            self.store.write_route(name, route.to_dict())
            self.store.append_event(name, event.to_json())
        return route

    def clear_route(self, name: str, *, reason: str = "", kind: str = "route_clear",
                    figures: dict | None = None) -> None:
        """Remove the split: bare `name` is the latest version again. Nothing happens when there is no route."""
        check_name(name)
        with self.store.locked(name):
            old, revision = self._route_now(name)
            if old is None:
                return
            event = new_event(name, kind, before=old.to_dict(), after=None, reason=reason, figures=figures)
            # the revision keeps counting through a clear, so a later route is never mistaken for an older one
            self.store.write_route(name, {"targets": {}, "mirror": None, "revision": revision + 1,
                                          "updated_at": time.time()})
            self.store.append_event(name, event.to_json())

    def _alias_event(self, name: str, kind: str, alias: str, before: int | None, after: int | None,
                     reason: str = "", figures: dict | None = None) -> None:
        """Record one alias move (the caller holds the lock and has made the move)."""
        event = new_event(name, kind, before={"alias": alias, "version": before},
                          after={"alias": alias, "version": after}, reason=reason, figures=figures)
        self.store.append_event(name, event.to_json())

    # ------------------------------------------------------------------------------------------- rollback
    def rollback(self, name: str, alias: str, *, reason: str = "") -> tuple[int | None, int]:
        """Move `alias` back to the version it pointed at before its last move; returns (from, to).

        The history is read as a stack: a rollback undoes the newest move not yet undone, so rolling back twice
        goes two moves back (8 -> 7 -> 6), never forth again."""
        check_name(name)
        check_alias(alias)
        with self.store.locked(name):
            current = self.store.read_aliases(name).get(alias)
            moves: list[tuple[str, tuple]] = []  # (kind, (before, after)) of each real move, oldest first
            for event in self.history(name):
                move = event.alias_move(alias)
                if move is None or move[0] == move[1]:
                    continue
                if moves and moves[-1][1] == move and event.kind not in ("rollback", "auto_rollback"):
                    continue  # one move recorded twice (an alias_set and the promote event that explains it)
                moves.append((event.kind, move))
            undone, target = 0, None
            for kind, move in reversed(moves):
                if kind in ("rollback", "auto_rollback"):
                    undone += 1
                elif undone:
                    undone -= 1
                else:
                    target = move
                    break
            if target is None:
                raise RegistryError(f"The history of `{name}` records no move of alias `{alias}` left to roll back "
                                    f"(aliases now: {self._alias_text(name)}); point it yourself with "
                                    f"`pipeline registry alias set {name} {alias} VERSION`.")
            before, after = target
            if before is None:
                raise RegistryError(f"Alias `{name}@{alias}` did not exist before its last recorded move (to "
                                    f"{after}); there is nothing to roll back to. Delete it with "
                                    f"`pipeline registry alias delete {name} {alias}` or point it elsewhere.")
            self.set_alias(name, alias, before, reason=reason or f"rollback of {name}@{alias} from {current}",
                           kind="rollback")
        return current, before

    # ------------------------------------------------------------------------------------------- retention
    def gc(self, name: str, keep_last: int, *, delete: bool = False, drop_parents: bool = False) -> list[int]:
        """The versions of `name` beyond the newest `keep_last` that nothing needs (deleted when `delete`).

        Never one an alias or the route (targets and mirror) points at, nor (unless `drop_parents`) one named
        as the parent of a kept version, transitively."""
        from registry.gc import plan_gc

        check_name(name)
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
            raise RegistryError(f"--keep-last {keep_last!r} must be a whole number >= 0 (how many of the newest "
                                "versions to keep whatever points at them).")
        with self.store.locked(name):  # aliases and route cannot move onto a doomed version meanwhile
            versions = {v.version: v.metadata for v in self.list_versions(name)}
            route, _ = self._route_now(name)
            doomed = plan_gc(name, versions, self.store.read_aliases(name), route, keep_last, drop_parents)
            if delete:
                for version in doomed:
                    self.delete_version(name, version)
        return doomed
