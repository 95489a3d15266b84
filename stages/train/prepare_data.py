"""Write the demo's data files when the config asks for it (`data.generate_if_missing`) and they are missing.

The default demo trains on synthetic arithmetic, so a fresh clone runs without downloading a data set; a
user's own files are never generated or overwritten.
"""

from __future__ import annotations

import logging
from pathlib import Path

from config import Config

log = logging.getLogger(__name__)


def _paths(files) -> list[Path]:
    return [Path(f).expanduser() for f in ([files] if isinstance(files, str) else files)]


def ensure_data(cfg: Config) -> list[str]:
    """Generate missing train/val files when `data.generate_if_missing` names a generator; returns the files
    written (none when everything exists or generation is off)."""
    if cfg.data.generate_if_missing is None:
        return []
    train, val = _paths(cfg.data.train_files), _paths(cfg.data.val_files)
    if all(p.exists() for p in train + val):
        return []
    if len(train) != 1 or len(val) != 1 or train[0].parent != val[0].parent:
        from ground.errors import ConfigError

        raise ConfigError(
            "data.generate_if_missing needs one train and one val file in the same folder (e.g. "
            "data/arithmetic/train.parquet and data/arithmetic/test.parquet); got "
            f"data.train_files={cfg.data.train_files} and data.val_files={cfg.data.val_files}."
        )
    from stages.train.arithmetic import make_arithmetic

    kwargs = {"seed": cfg.data.seed, **cfg.data.generate_kwargs}
    try:
        written = make_arithmetic(train[0].parent, train_name=train[0].name, test_name=val[0].name, **kwargs)
    except TypeError as exc:  # an unknown keyword in data.generate_kwargs
        from ground.errors import ConfigError

        raise ConfigError(f"data.generate_kwargs={cfg.data.generate_kwargs}: {exc}. Valid keywords: n_train, "
                          "n_test, low, high, ops, seed.") from None
    log.info("Wrote the %s data set to %s", cfg.data.generate_if_missing, train[0].parent)
    return [str(p) for p in written]
