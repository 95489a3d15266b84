"""The reward scorer registry: scorers by name, and which `data_source` values each one scores.

A scorer is `fn(solution_str: str, ground_truth: str, extra_info: dict) -> dict` with at least `score` (float)
and `acc` (1.0/0.0 where the scorer defines correctness, else None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ground.names import NameRegistry


@dataclass(frozen=True)
class Scorer:
    name: str
    fn: Callable[[str, str, dict], dict]
    data_sources: tuple[str, ...]

    @property
    def description(self) -> str:
        doc = (self.fn.__doc__ or "").strip().splitlines()
        return doc[0].strip() if doc else ""


REWARD_SCORERS: NameRegistry[Scorer] = NameRegistry("reward scorer")
DATA_SOURCE_SCORERS: NameRegistry[str] = NameRegistry("data_source with a scorer")  # data_source -> scorer name


def register_scorer(name: str, data_sources: tuple[str, ...] = ()):
    """Register a scorer under `name`, dispatched for rows whose data_source is `name` or one of `data_sources`."""

    def wrap(fn):
        REWARD_SCORERS.add(name, Scorer(name, fn, tuple(data_sources)))
        for source in (name, *data_sources):
            DATA_SOURCE_SCORERS.add(source, name)
        return fn

    return wrap


def scorer_for_data_source(data_source: str) -> Optional[Scorer]:
    name = DATA_SOURCE_SCORERS.get(data_source)
    return REWARD_SCORERS[name] if name else None
