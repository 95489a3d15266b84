"""Warnings for keys that are valid but have no effect in the mode the rest of the config chooses.

A refused value is an error (the schema's `Literal`s and validators); these are values that would be honoured in
another mode, so the loader accepts them and says, once at load time, which key does nothing and why.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ground.adapter_files import ADAPTER_CONFIG

from config.schema import Config

log = logging.getLogger(__name__)


def inert_keys(cfg: Config) -> list[str]:
    """One message per key whose value changes nothing under this config."""
    return [*_lora_keys_replaced_by_the_adapter(cfg), *_layered_summon_in_merged_sync(cfg),
            *_overlong_log_without_shaping(cfg), *_rollout_correction_thresholds_unused(cfg)]


def warn_inert_keys(cfg: Config) -> None:
    """Log each of `inert_keys` as a warning (called by `config.loader.load_config`)."""
    for message in inert_keys(cfg):
        log.warning("%s", message)


def _saved_adapter_config(path: str) -> dict[str, Any] | None:
    """The adapter_config.json of a local adapter folder; None for a registry reference or a missing file (a
    reference is resolved to a folder only when training starts, and a missing folder is refused then)."""
    file = Path(path).expanduser() / ADAPTER_CONFIG
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def _as_set(value) -> frozenset | None:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        # "all-linear" (or a regex) names modules only once PEFT has matched it against the model: not comparable
        return None
    return frozenset(value)


def _lora_keys_replaced_by_the_adapter(cfg: Config) -> list[str]:
    model = cfg.actor_rollout_ref.model
    if not model.lora_adapter_path:
        return []
    saved = _saved_adapter_config(model.lora_adapter_path)
    if saved is None:
        return []
    differing = [(key, ours, saved[name]) for key, ours, name in
                 (("lora_rank", model.lora_rank, "r"), ("lora_alpha", model.lora_alpha, "lora_alpha"))
                 if saved.get(name) is not None and saved[name] != ours]
    for key in ("target_modules", "exclude_modules"):  # PEFT writes null for "none excluded"
        ours, theirs = _as_set(getattr(model, key)), _as_set(saved.get(key))
        if key in saved and ours is not None and theirs is not None and ours != theirs:
            differing.append((key, getattr(model, key), saved[key]))
    return [f"actor_rollout_ref.model.{key}={ours!r} ({cfg.source_of(f'actor_rollout_ref.model.{key}')}) has no "
            f"effect on the policy: training continues from actor_rollout_ref.model.lora_adapter_path="
            f"{model.lora_adapter_path}, whose adapter_config.json sets {theirs!r}, and the policy's LoRA layout "
            f"comes from that file (a PPO critic still uses {key}). Remove the key or set it to {theirs!r}."
            for key, ours, theirs in differing]


def _layered_summon_in_merged_sync(cfg: Config) -> list[str]:
    rollout = cfg.actor_rollout_ref.rollout
    merged = rollout.lora_sync == "merged" or (rollout.lora_sync == "auto" and cfg.trainer.device == "cpu")
    if not (rollout.layered_summon and merged):
        return []
    why = "lora_sync=merged" if rollout.lora_sync == "merged" else "lora_sync=auto on trainer.device=cpu"
    return [f"actor_rollout_ref.rollout.layered_summon=True has no effect with merged sync ({why}): merged sync "
            "always gathers, merges and writes one decoder layer at a time, and the final adapter and checkpoints "
            "are always gathered layer by layer. It changes only lora_sync=adapter."]


def _overlong_log_without_shaping(cfg: Config) -> list[str]:
    shaping = cfg.reward_model.overlong_buffer
    if not shaping.log or shaping.enable:
        return []
    return ["reward_model.overlong_buffer.log=True has no effect while reward_model.overlong_buffer.enable=False: "
            "there is no overlong reward to log. Set enable=True to shape (and log) it."]


def _rollout_correction_thresholds_unused(cfg: Config) -> list[str]:
    rc = cfg.algorithm.rollout_correction
    out = []
    default_threshold = type(rc).model_fields["rollout_is_threshold"].default
    if rc.rollout_is is None and rc.rollout_is_threshold != default_threshold:
        out.append(f"algorithm.rollout_correction.rollout_is_threshold={rc.rollout_is_threshold} has no effect while "
                   "rollout_is is null: no importance weight is applied. Set rollout_is=token or sequence to use it.")
    if rc.rollout_rs is None and rc.rollout_rs_threshold is not None:
        out.append(f"algorithm.rollout_correction.rollout_rs_threshold={rc.rollout_rs_threshold!r} has no effect while "
                   "rollout_rs is null: nothing is rejected. Set rollout_rs (e.g. token_k1) to use it.")
    return out


def warn_replaced_local_dir(cfg: Config, replacement: str) -> None:
    """For a command that puts checkpoints elsewhere (`pipeline run` uses the run's stage folder): warn when the
    user set trainer.default_local_dir, which that command does not read."""
    source = cfg.source_of("trainer.default_local_dir")
    if source in ("the schema default", "the config"):
        return
    log.warning("trainer.default_local_dir=%s (%s) is not used by this command: its checkpoints go to %s, so that "
                "`--resume` finds them; `pipeline train` is the command that writes to trainer.default_local_dir.",
                cfg.trainer.default_local_dir, source, replacement)
