"""Check the data files before anything slow starts, and write the demo's files when they are the demo's.

The default demo trains on synthetic arithmetic, so a fresh clone runs without downloading a data set. The
generator (`data.generate_if_missing`) writes only when every file it would write is missing, and only into
paths it was configured with (`config.loader` turns it off when the user names their own paths later); it
never opens an existing file for writing. A user's file is never generated into or overwritten.
"""

from __future__ import annotations

import logging
from pathlib import Path

from config import Config
from ground.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEMO_DATA_DIR = "data/arithmetic"


def _paths(files) -> list[Path]:
    return [Path(f).expanduser() for f in ([files] if isinstance(files, str) else files)]


def _labelled(cfg: Config) -> list[tuple[str, Path]]:
    """(config key, path) for every train and val file."""
    return ([("data.train_files", p) for p in _paths(cfg.data.train_files)]
            + [("data.val_files", p) for p in _paths(cfg.data.val_files)])


def _describe(cfg: Config, key: str, path: Path) -> str:
    return f"`{path}` ({key}, from {cfg.source_of(key)})"


def _missing_error(cfg: Config, missing: list[tuple[str, Path]], all_missing: bool) -> DataError:
    what = "; ".join(_describe(cfg, key, path) for key, path in missing)
    plural = len(missing) > 1
    why = ""
    if "turned off" in cfg.source_of("data.generate_if_missing"):
        why = (" The demo's generator writes only the paths it was configured with, never a path you named "
               f"(data.generate_if_missing: {cfg.source_of('data.generate_if_missing')}).")
    mark = (" or, if these paths are meant for the demo's generated data, add data.generate_if_missing=arithmetic;"
            if all_missing else "")
    return DataError(
        f"Data file{'s' if plural else ''} {what} {'do' if plural else 'does'} not exist.{why} Fix the path; or "
        f"create the file (`pipeline data make-arithmetic --out DIR` writes the demo's DIR/train.parquet and "
        f"DIR/test.parquet; examples/gsm8k_to_parquet.py converts GSM8K);{mark} or drop your data.*_files "
        f"settings to train on the demo's own {DEMO_DATA_DIR}/ files."
    )


def _partial_error(cfg: Config, missing: list[tuple[str, Path]], present: list[tuple[str, Path]]) -> DataError:
    return DataError(
        f"data.generate_if_missing={cfg.data.generate_if_missing} writes the train and val files only when all of "
        f"them are missing, and {', '.join(_describe(cfg, k, p) for k, p in present)} exists while "
        f"{', '.join(_describe(cfg, k, p) for k, p in missing)} does not; nothing was written. Fix one of: create "
        f"the missing file yourself; point data.train_files and data.val_files at the demo's folder "
        f"({DEMO_DATA_DIR}/train.parquet and {DEMO_DATA_DIR}/test.parquet, or a new folder); or set "
        "data.generate_if_missing=null to use only your own files."
    )


def ensure_data(cfg: Config) -> list[str]:
    """Make sure every train/val file exists; returns the files written (none unless the demo's were missing).

    Missing files are generated only when `data.generate_if_missing` names a generator and *every* file is
    missing; otherwise a DataError names each missing file, the key and source that gave it, and the fixes.
    Cheap (no model, no Ray): the CLI calls it before staging the model."""
    labelled = _labelled(cfg)
    missing = [(k, p) for k, p in labelled if not p.exists()]
    if not missing:
        return []
    if cfg.data.generate_if_missing is None:
        raise _missing_error(cfg, missing, all_missing=len(missing) == len(labelled))
    present = [(k, p) for k, p in labelled if p.exists()]
    if present:
        raise _partial_error(cfg, missing, present)
    train, val = _paths(cfg.data.train_files), _paths(cfg.data.val_files)
    if len(train) != 1 or len(val) != 1 or train[0].parent != val[0].parent or train[0].name == val[0].name:
        raise ConfigError(
            "data.generate_if_missing needs one train and one val file, with different names, in the same folder "
            "(e.g. data/arithmetic/train.parquet and data/arithmetic/test.parquet); got "
            f"data.train_files={cfg.data.train_files} and data.val_files={cfg.data.val_files}."
        )
    from stages.train.arithmetic import make_arithmetic

    kwargs = {"seed": cfg.data.seed, **cfg.data.generate_kwargs}
    try:
        written = make_arithmetic(train[0].parent, train_name=train[0].name, test_name=val[0].name,
                                  **kwargs, replace=False)
    except TypeError as exc:  # an unknown keyword in data.generate_kwargs
        raise ConfigError(f"data.generate_kwargs={cfg.data.generate_kwargs}: {exc}. Valid keywords: n_train, "
                          "n_test, low, high, ops, seed.") from None
    log.info("Wrote the %s data set to %s", cfg.data.generate_if_missing, train[0].parent)
    return [str(p) for p in written]
