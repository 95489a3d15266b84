"""Rewards for RL training: rule-based scorers picked by each row's `data_source`, or a custom Python function.

    reward_fn = RewardFunction(cfg)                      # cfg: config.Config
    results = reward_fn(data_sources, solution_strs, ground_truths, extra_infos)
    results[i] == {"score": 1.0, "acc": 1.0, ...}

Dispatch: `custom_reward_function.path` (verl's key) if set, else `reward_model.scorer` if set, else the scorer
registered for the row's `data_source` (see `pipeline algorithms`). A scorer that raises, or returns something
that is not a finite number, stops the run with a RewardError naming the scorer and the row.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import numbers
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ground.errors import ConfigError, RewardError
from stages.train.rewards import feedback, scorers  # noqa: F401  (registers the built-in scorers)
from stages.train.rewards.registry import (  # noqa: F401
    DATA_SOURCE_SCORERS,
    REWARD_SCORERS,
    Scorer,
    register_scorer,
    scorer_for_data_source,
)


def load_custom_scorer(path: str, name: str = "compute_score") -> Callable:
    """Import `name` from the Python file at `path` (custom_reward_function.path / .name)."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise ConfigError(
            f"custom_reward_function.path={path!r}: no such file. Point it at a Python file defining "
            f"`def {name}(data_source, solution_str, ground_truth, extra_info)` returning a float or a dict with 'score'."
        )
    # A stable module name per file (hashlib, not hash()): two custom files never shadow each other.
    module_name = "custom_reward_" + hashlib.sha256(str(file).encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ConfigError(f"custom_reward_function.path={path!r} cannot be imported as a Python module (a .py file?).")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code: report it as a config problem with its cause
        raise ConfigError(f"custom_reward_function.path={path!r} failed to import: {type(exc).__name__}: {exc}") from exc
    sys.modules[module_name] = module
    fn = getattr(module, name, None)
    if fn is None:
        defined = sorted(k for k, v in vars(module).items() if inspect.isfunction(v) and not k.startswith("_"))
        raise ConfigError(
            f"custom_reward_function.name={name!r} is not defined in {file}; functions there: "
            f"{', '.join(defined) or 'none'}. Set custom_reward_function.name to one of them."
        )
    if not callable(fn):
        raise ConfigError(f"custom_reward_function.name={name!r} in {file} is a {type(fn).__name__}, not a function.")
    return fn


def _as_result(raw: Any, scorer: str, row: int, data_source: str) -> dict:
    """A scorer's float or dict -> {"score": float, "acc": float | None, ...}; anything else is a RewardError."""
    where = f"reward scorer `{scorer}` on row {row} (data_source={data_source!r})"
    if isinstance(raw, dict):
        if "score" not in raw:
            raise RewardError(f"{where} returned a dict without a 'score' key (keys: {sorted(raw)}).")
        result = dict(raw)
    else:
        result = {"score": raw}
    score = result["score"]
    if isinstance(score, bool) or not isinstance(score, numbers.Real) or not math.isfinite(float(score)):
        raise RewardError(f"{where} returned score {score!r} ({type(score).__name__}); a finite number is required.")
    result["score"] = float(score)
    acc = result.get("acc")
    result["acc"] = None if acc is None else float(acc)
    return result


class RewardFunction:
    """Scores a batch of responses; built from the Config (custom_reward_function, reward_model.scorer)."""

    def __init__(self, cfg) -> None:
        custom = cfg.custom_reward_function
        self.forced_scorer: Optional[str] = getattr(cfg.reward_model, "scorer", None)
        self.custom_fn: Optional[Callable] = None
        self.custom_label = ""
        if custom.path:
            self.custom_fn = load_custom_scorer(custom.path, custom.name)
            self.custom_label = f"{custom.name} from {custom.path}"
        elif self.forced_scorer:
            REWARD_SCORERS.canonical(self.forced_scorer, "reward_model.scorer")

    def _score_row(self, i: int, data_source: str, solution: str, truth: Any, extra: dict) -> dict:
        if self.custom_fn is not None:
            label, call = self.custom_label, lambda: self.custom_fn(data_source, solution, truth, extra)
        else:
            scorer = REWARD_SCORERS.get(self.forced_scorer) if self.forced_scorer else scorer_for_data_source(data_source)
            if scorer is None:
                raise RewardError(
                    f"row {i}: no reward scorer for data_source={data_source!r}; known data sources: "
                    f"{', '.join(DATA_SOURCE_SCORERS)}. Set custom_reward_function.path to score it, or "
                    "reward_model.scorer to use one scorer for every row."
                )
            label, call = scorer.name, lambda: scorer.fn(solution, truth, extra)
        try:
            raw = call()
        except RewardError:
            raise
        except Exception as exc:
            raise RewardError(
                f"reward scorer `{label}` raised {type(exc).__name__}: {exc} on row {i} (data_source={data_source!r})."
            ) from exc
        return _as_result(raw, label, i, data_source)

    def __call__(self, data_sources: Sequence[str], solution_strs: Sequence[str], ground_truths: Sequence[Any],
                 extra_infos: Optional[Sequence[Optional[dict]]] = None) -> list[dict]:
        n = len(solution_strs)
        if extra_infos is None:
            extra_infos = [None] * n
        if not len(data_sources) == len(ground_truths) == len(extra_infos) == n:
            raise ValueError("data_sources, solution_strs, ground_truths and extra_infos must have the same length")
        return [self._score_row(i, ds, sol, gt, extra or {})
                for i, (ds, sol, gt, extra) in enumerate(zip(data_sources, solution_strs, ground_truths, extra_infos))]
