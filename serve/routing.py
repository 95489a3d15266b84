"""Traffic routes in the server: which target of `NAME`'s route a request for the bare `NAME` goes to.

A route (registry/routes.py, set with `pipeline registry route set NAME prod=90 canary=10 [--mirror canary]`)
splits the traffic of the bare `NAME` between targets, each an alias or a version. Only the bare name follows it:
`NAME@alias`, `NAME@V` and `NAME@latest` are exact references and stay what they say. Without a route, `NAME`
means the latest version, as it always did.

The split is sticky per caller: the key is the OpenAI `user` field of the body, else the `x-session-id` header;
`Route.pick` hashes it with the name, so one caller stays on one target while the route is unchanged. A request
with neither is split at random. The chosen target is then pinned like any reference (`NAME@prod` -> `NAME@7`),
so a request in flight finishes on its version whatever happens to the route meanwhile, and the response's
`model` field names the version that answered.
"""

from __future__ import annotations

from dataclasses import dataclass

SESSION_HEADER = b"x-session-id"


@dataclass(frozen=True)
class RouteChoice:
    """Where one request for the bare `name` goes: `target` (the route's target string, e.g. "prod" or "7"),
    and the route's mirror target (None without one). `revision` identifies the route it was chosen from."""

    name: str
    target: str
    mirror: str | None
    revision: int

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.target}"

    @property
    def mirror_ref(self) -> str | None:
        return f"{self.name}@{self.mirror}" if self.mirror else None


def routed_name(model: str) -> str | None:
    """The adapter name when `model` is a bare `NAME` (or `models:/NAME`), the one form that follows a route;
    None for every exact reference and for anything that is not a valid reference (its own lookup refuses it)."""
    from ground.errors import RegistryError
    from registry import parse_ref

    text = model.removeprefix("models:/")
    if "@" in text or "/" in text:  # NAME@V, NAME@alias, NAME@latest, models:/NAME/V
        return None
    try:
        name, version, alias = parse_ref(model)
    except (RegistryError, ValueError):
        return None
    return name if version is None and alias is None else None


def caller_key(body: dict, session_header: str | None) -> str | None:
    """What keeps a caller on one target: the OpenAI `user` field, else the `x-session-id` header, else None."""
    user = body.get("user")
    if isinstance(user, str) and user:
        return user
    return session_header or None


def choose(route, name: str, key: str | None) -> RouteChoice:
    """The target of `route` (a registry.routes.Route) for a caller with `key` (None: a random draw)."""
    return RouteChoice(name=name, target=route.pick(key), mirror=route.mirror, revision=route.revision)
