"""The append-only history of an adapter: every alias move, route change, promotion and rollback, as an event.

Each event says when (UTC), who (user and host), what (kind, before, after), why (reason) and on what evidence
(figures, e.g. a promotion gate's rewards and error rates). The local store appends one JSON line per event to
`adapters/NAME/history.jsonl`; the MLflow store writes one registered-model tag per event under a key nobody
else writes (registry/mlflow_layout.py). Neither ever rewrites an event, so two writers at once lose none.

Alias events (`alias_set`, `alias_delete`, `promote`, `rollback`, `auto_rollback` of an alias) have
`before`/`after` = {"alias": ALIAS, "version": V or None}; route events have the route's `to_dict()` or None.
"""

from __future__ import annotations

import getpass
import json
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from ground.errors import RegistryError

KINDS = ("alias_set", "alias_delete", "route_set", "route_clear", "promote", "rollback", "auto_rollback")
ALIAS_MOVES = ("alias_set", "alias_delete", "promote", "rollback", "auto_rollback")
REASON_MAX = 1000  # characters kept of a reason: an event must fit one MLflow tag (5,000 characters)


@dataclass(frozen=True)
class Event:
    time: str  # ISO-8601 UTC, microseconds
    user: str
    host: str
    kind: str
    name: str
    before: object
    after: object
    reason: str = ""
    figures: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> "Event":
        return cls(time=str(data.get("time", "")), user=str(data.get("user", "")), host=str(data.get("host", "")),
                   kind=str(data.get("kind", "")), name=str(data.get("name", "")), before=data.get("before"),
                   after=data.get("after"), reason=str(data.get("reason") or ""), figures=dict(data.get("figures") or {}))

    def alias_move(self, alias: str) -> tuple[int | None, int | None] | None:
        """(version before, version after) when this event moved `alias`, else None."""
        if self.kind not in ALIAS_MOVES:
            return None
        before, after = self.before, self.after
        if not (isinstance(after, dict) and after.get("alias") == alias):
            return None
        return (before or {}).get("version") if isinstance(before, dict) else None, after.get("version")

    def summary(self) -> str:
        """One line for `pipeline registry history`."""
        def side(value) -> str:
            if value is None:
                return "-"
            if isinstance(value, dict) and "alias" in value:
                return f"{value['alias']}->{value['version'] if value.get('version') is not None else '-'}"
            if isinstance(value, dict) and "targets" in value:
                text = " ".join(f"{t}={w}" for t, w in (value.get("targets") or {}).items()) or "(none)"
                return text + (f" mirror={value['mirror']}" if value.get("mirror") else "")
            return json.dumps(value, default=str)

        line = f"{self.time}  {self.kind:<13} {side(self.before)}  =>  {side(self.after)}  by {self.user}@{self.host}"
        if self.reason:
            line += f"  ({self.reason})"
        if self.figures:
            line += "  " + json.dumps(self.figures, default=str, sort_keys=True)
        return line


def new_event(name: str, kind: str, *, before, after, reason: str = "", figures: dict | None = None) -> Event:
    """An event stamped now, by this user on this host; refuses an unknown kind or figures that are not JSON."""
    if kind not in KINDS:
        raise RegistryError(f"History event kind {kind!r} is unknown; use one of {', '.join(KINDS)}.")
    figures = dict(figures or {})
    try:
        json.dumps([before, after, figures])
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"The {kind} event of `{name}` holds a value JSON cannot store ({exc}); pass plain "
                            "numbers, strings, lists and dicts as before/after/figures.") from None
    reason = str(reason or "")
    if len(reason) > REASON_MAX:
        reason = reason[:REASON_MAX] + f"... ({len(reason)} characters)"
    return Event(time=datetime.fromtimestamp(time.time(), timezone.utc).isoformat(timespec="microseconds"),
                 user=_user(), host=socket.gethostname(), kind=kind, name=name, before=before, after=after,
                 reason=reason, figures=figures)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no $USER (some containers)
        return "unknown"
