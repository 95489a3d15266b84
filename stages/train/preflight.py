"""Checks that run before any worker or engine starts: a bad config should cost a second, not a Ray start.

Module names are read from the safetensors headers (the first few KB of each file), so checking
`target_modules` against a multi-GB model loads no weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from config import Config, validate
from ground.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PICKLED_WEIGHTS
from ground.errors import ConfigError, StageError
from ground.model_files import check_safetensors


def tensor_names(model_dir: str | Path) -> list[str]:
    """Every tensor name in the model folder's safetensors files, from their JSON headers only."""
    names = []
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise StageError(f"`{model_dir}` holds no *.safetensors weights; stage the model first (pipeline stage-model).")
    for path in files:
        names.extend(k for k in check_safetensors(path) if k != "__metadata__")
    return names


def module_names(model_dir: str | Path) -> list[str]:
    """Names of the modules that own a `.weight` (Linear, Embedding, norms), as PEFT sees them."""
    mods = sorted({n[: -len(".weight")] for n in tensor_names(model_dir) if n.endswith(".weight")})
    cfg_file = Path(model_dir) / "config.json"
    if cfg_file.is_file() and json.loads(cfg_file.read_text()).get("tie_word_embeddings") and "lm_head" not in mods:
        mods.append("lm_head")  # tied: the module exists though its weight is stored only once
    return mods


def _matches(key: str, module: str) -> bool:
    # PEFT's rule for a list entry: the full module name, or its last dotted parts
    return module == key or module.endswith("." + key)


def check_target_modules(model_cfg, model_dir: str | Path) -> None:
    mods = module_names(model_dir)
    leaves = sorted({m.rsplit(".", 1)[-1] for m in mods})
    target = model_cfg.target_modules
    where = "actor_rollout_ref.model.target_modules"
    if isinstance(target, str):
        if target == "all-linear":
            return
        try:
            found = any(re.fullmatch(target, m) for m in mods)
        except re.error as exc:
            raise ConfigError(f"{where}={target!r} is not a valid regular expression: {exc}.") from None
        if not found:
            raise ConfigError(
                f"{where}={target!r} matches no module of the model at `{model_dir}` (a string is a regular "
                f"expression over full module names, e.g. `.*\\.(q_proj|v_proj)`). Its module names end in: "
                f"{', '.join(leaves)}. Use a list of those, or all-linear."
            )
        return
    missing = [t for t in target if not any(_matches(t, m) for m in mods)]
    if missing:
        raise ConfigError(
            f"{where} names {missing} but the model at `{model_dir}` has no such module. Its module names end in: "
            f"{', '.join(leaves)}. Fix the list (e.g. [q_proj, v_proj]) or use all-linear."
        )


def check_adapter_path(path: str) -> None:
    p = Path(path).expanduser()
    if not (p / ADAPTER_CONFIG).is_file():
        raise ConfigError(
            f"actor_rollout_ref.model.lora_adapter_path=`{path}` is not a PEFT adapter folder (no {ADAPTER_CONFIG})."
        )
    if not (p / ADAPTER_WEIGHTS).is_file():
        extra = (f" It holds {PICKLED_WEIGHTS}, a pickle file this project never loads; convert it to safetensors "
                 "where you trust it." if (p / PICKLED_WEIGHTS).is_file() else "")
        raise ConfigError(f"actor_rollout_ref.model.lora_adapter_path=`{path}` has no {ADAPTER_WEIGHTS}.{extra}")


def preflight(cfg: Config, model_dir: str | Path) -> None:
    """Every check that needs no worker: each failure is a ConfigError naming the key and the fix."""
    from stages.train.core_algos import check_algorithm_names
    from stages.train.rollout import vllm_max_lora_rank

    validate(cfg)  # the config's own rules (load_format, ranks, ...), also for a Config built in code
    arr = cfg.actor_rollout_ref
    vllm_max_lora_rank(max(arr.model.lora_rank, arr.rollout.max_lora_rank or 0))
    if not (Path(model_dir) / "config.json").is_file():
        raise StageError(f"model folder `{model_dir}` has no config.json; stage the model first.")
    check_target_modules(arr.model, model_dir)
    if arr.model.lora_adapter_path:
        check_adapter_path(arr.model.lora_adapter_path)
    check_algorithm_names(cfg)
    if cfg.trainer.cpu_workers < 1:
        raise ConfigError(f"trainer.cpu_workers={cfg.trainer.cpu_workers} must be >= 1.")
