"""`trainer.logger`: the trackers a run writes to, with verl's names, checked when the config loads.

`console` and `mlflow` need nothing extra. `wandb` and `tensorboard` are optional extras of the package
(`pip install 'lora-pipeline[wandb]'`); asking for one whose package is missing is refused here, naming the extra,
rather than at the first step of a training run that may have taken minutes to start. `file` is verl's JSONL
logger (stages/train/loggers.py says where each of them writes).
"""

from __future__ import annotations

import importlib.util

from ground.errors import ConfigError

SUPPORTED_LOGGERS = ("console", "mlflow", "wandb", "tensorboard", "file")
# logger -> (the module it imports, the package extra that installs it)
OPTIONAL_PACKAGES = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboard", "tensorboard")}
# verl's other trackers, refused by name so a verl user knows it is the tracker, not a typo
VERL_ONLY = ("swanlab", "clearml", "trackio", "vemlp_wandb")


def logger_names(cfg) -> list[str]:
    """`trainer.logger` as a list (verl accepts a single name too)."""
    value = cfg.trainer.logger
    return [value] if isinstance(value, str) else list(value)


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (wandb alone takes ~0.4 s to import)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_loggers(cfg) -> None:
    loggers = logger_names(cfg)
    where = f"trainer.logger={loggers} (from {cfg.source_of('trainer.logger')})"
    unknown = [name for name in loggers if name not in SUPPORTED_LOGGERS]
    if unknown:
        known = [name for name in unknown if name in VERL_ONLY]
        raise ConfigError(
            f"{where}: {', '.join(unknown)} is not supported"
            + (f" ({', '.join(known)} is a verl tracker this project does not have)" if known else "")
            + f"; supported: {', '.join(SUPPORTED_LOGGERS)}, in any combination. "
            "Set e.g. trainer.logger=[console,mlflow] or trainer.logger=[console,wandb]."
        )
    for name in loggers:
        module, extra = OPTIONAL_PACKAGES.get(name, (None, None))
        if module and not installed(module):
            raise ConfigError(
                f"{where}: the {name} logger needs the `{module}` package, which is not installed in this "
                f"environment. Install the extra: pip install 'lora-pipeline[{extra}]' (scripts/setup.sh installs "
                f"it), or remove {name} from trainer.logger."
            )
