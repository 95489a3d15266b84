"""Traffic splits: a route sends a bare `NAME` to weighted targets (aliases or version numbers).

    pipeline registry route set arithmetic prod=90 canary=10 --mirror canary

A request for `NAME` then goes to `NAME@prod` or `NAME@canary`; `NAME@alias` and `NAME@V` stay exact. The pick is
sticky per caller: with a key (the OpenAI `user` field, else the `x-session-id` header) a hash of name and key
lands on one of 100 buckets, laid out over the targets' cumulative weights in the listed order, so one caller
stays on one target while the route is unchanged. A caller without a key is split per request.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from ground.errors import RegistryError
from registry.refs import ALIAS_RE, VERSION_RE, shown

TOTAL = 100  # weights are whole percents


@dataclass(frozen=True)
class Route:
    name: str
    targets: tuple[tuple[str, int], ...]  # (alias or version number as a string, weight), in the listed order
    mirror: str | None
    revision: int  # 1 for the first route of a name, +1 on every change (clearing included)
    updated_at: float  # unix time

    def pick(self, key: str | None, rng: random.Random | None = None) -> str:
        """The target a request goes to: by a stable hash of (name, key) when there is a key, else at random."""
        if key is None:
            bucket = (rng or random).randrange(TOTAL)
        else:
            digest = hashlib.sha256(f"{self.name}\x00{key}".encode()).digest()
            bucket = int.from_bytes(digest[:8], "big") % TOTAL
        upto = 0
        for target, weight in self.targets:
            upto += weight
            if bucket < upto:  # a weight of 0 adds no bucket, so its target is never picked
                return target
        raise AssertionError(f"route of {self.name} has weights summing to {upto}, not {TOTAL}")

    @property
    def weights(self) -> dict[str, int]:
        return dict(self.targets)

    def describe(self) -> str:
        """`prod=90 canary=10 (mirror canary)`: the form `route set` takes."""
        text = " ".join(f"{t}={w}" for t, w in self.targets)
        return text + (f" (mirror {self.mirror})" if self.mirror else "")

    def to_dict(self) -> dict:
        """What the stores keep and history events show (the targets keep their order: a JSON object does too)."""
        return {"targets": dict(self.targets), "mirror": self.mirror, "revision": self.revision,
                "updated_at": self.updated_at}

    @classmethod
    def from_dict(cls, name: str, data: dict) -> "Route | None":
        """None for a cleared route (no targets); RegistryError when the stored record is not a route."""
        try:
            targets = tuple((str(t), int(w)) for t, w in (data.get("targets") or {}).items())
            route = cls(name, targets, data.get("mirror"), int(data["revision"]), float(data["updated_at"]))
        except (AttributeError, KeyError, TypeError, ValueError):
            raise RegistryError(f"The stored route of `{name}` is unreadable ({str(data)[:200]}); set it again with "
                                f"`pipeline registry route set {name} ...` or clear it.") from None
        return route if targets else None


def check_weights(name: str, targets) -> tuple[tuple[str, int], ...]:
    """Targets as given (dict target -> weight) -> ordered pairs; refuses non-integers, negatives, a total other
    than 100, and target strings that are neither an alias name nor a version number."""
    if not isinstance(targets, dict) or not targets:
        raise RegistryError(f"A route of `{name}` needs at least one target, e.g. "
                            f"`pipeline registry route set {name} prod=90 canary=10`.")
    pairs = []
    for target, weight in targets.items():
        target = str(target)
        if not (VERSION_RE.fullmatch(target) or ALIAS_RE.fullmatch(target)):
            raise RegistryError(f"Route target {shown(target)} of `{name}` is neither an alias name nor a version number; "
                                f"write ALIAS=WEIGHT or VERSION=WEIGHT, e.g. prod=90 7=10.")
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise RegistryError(f"Route weight {weight!r} of target `{target}` (adapter `{name}`) is not an integer; "
                                "weights are whole percents summing to 100, e.g. prod=90 canary=10.")
        if weight < 0:
            raise RegistryError(f"Route weight {weight} of target `{target}` (adapter `{name}`) is negative; weights "
                                "are whole percents from 0 to 100 summing to 100.")
        pairs.append((target, weight))
    total = sum(w for _, w in pairs)
    if total != TOTAL:
        given = " ".join(f"{t}={w}" for t, w in pairs)
        raise RegistryError(f"Route weights of `{name}` sum to {total} ({given}), not 100; change them so they add up "
                            "to 100, e.g. prod=90 canary=10.")
    return tuple(pairs)


def parse_weight_args(name: str, args) -> dict[str, int]:
    """CLI words `prod=90 canary=10` -> {"prod": 90, "canary": 10}; refuses malformed words and repeated targets."""
    out: dict[str, int] = {}
    for word in args:
        target, sep, text = word.partition("=")
        if not sep or not target:
            raise RegistryError(f"Route target {shown(word)} is not of the form TARGET=WEIGHT; write e.g. "
                                f"`pipeline registry route set {name} prod=90 canary=10`.")
        if target in out:
            raise RegistryError(f"Route target `{target}` is given twice ({' '.join(args)}); name each target once.")
        try:
            out[target] = int(text.strip(), 10)
        except ValueError:
            raise RegistryError(f"Route weight {shown(text)} of target {shown(target)} is not an integer; weights are whole "
                                "percents summing to 100, e.g. prod=90 canary=10.") from None
    return out
