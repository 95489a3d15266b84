"""The trackers besides MLflow that `trainer.logger` names, with verl's meaning (stages/train/tracking.py fans every
metric out to them).

Where each one writes; `out` is the training stage's folder (`runs/<run>/train` under a pipeline). The environment
variables are verl's, and win when set:

- `wandb`: `wandb.init(project=trainer.project_name, name=trainer.experiment_name, config=<the resolved config>)`,
  its run folder under $WANDB_DIR, else under `out` (`out/wandb/run-...`, or `offline-run-...` with
  `WANDB_MODE=offline`; `wandb sync <folder>` uploads it later). The validation table goes in as a W&B table.
- `tensorboard`: $TENSORBOARD_DIR, else `out/tensorboard_log/<project_name>/<experiment_name>` (verl's relative
  default, rooted in the run's folder instead of the working directory); the validation table as text.
- `file`: $VERL_FILE_LOGGER_PATH, else `${VERL_FILE_LOGGER_ROOT:-out/file_log}/<project_name>/<experiment_name>.jsonl`,
  one line `{"step": N, "data": {...}}` per record, as verl's file logger writes. Appended to, never truncated
  (a resumed run continues its file; verl's logger would start it over).

A tracker that cannot start (W&B online without an API key or without network) is a StageError naming the fix,
raised while the run starts, before its first step.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from ground.errors import StageError

log = logging.getLogger(__name__)


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


class WandbLogger:
    name = "wandb"

    def __init__(self, cfg, out: Path):
        import wandb

        t = cfg.trainer
        root = Path(os.environ.get("WANDB_DIR") or out).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        try:
            # reinit="create_new": two trainers in one process get a run each (as their MLflow runs are separate);
            # console="off": the run's pipeline.log already holds the output.
            self.run = wandb.init(project=t.project_name, name=t.experiment_name, config=cfg.to_dict(), dir=str(root),
                                  reinit="create_new", settings=wandb.Settings(console="off", quiet=True))
        except Exception as exc:  # wandb raises UsageError (no API key), CommError (no network), ...
            raise StageError(
                f"trainer.logger has wandb, but W&B could not start a run (project {t.project_name!r}): "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else exc!r}. Log in (`wandb login` or "
                "WANDB_API_KEY) on a machine that reaches the W&B server, or run offline with WANDB_MODE=offline "
                "and upload later with `wandb sync`, or remove wandb from trainer.logger."
            ) from exc
        self.folder = Path(self.run.dir).parent  # run.dir is the run folder's files/
        self.offline = self.run.offline

    @property
    def where(self) -> str:
        if self.offline:
            return f"{self.folder} (offline; upload with `wandb sync {self.folder}`)"
        return f"{self.run.url} (local files {self.folder})"

    def log_metrics(self, metrics: dict, step: int) -> None:
        values = _numbers(metrics)
        if values:
            self.run.log(values, step=step)

    def log_table(self, rows: list[dict], step: int) -> None:
        import wandb

        columns = list(dict.fromkeys(k for row in rows for k in row))
        table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        self.run.log({"val/generations": table}, step=step)

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class TensorBoardLogger:
    name = "tensorboard"

    def __init__(self, cfg, out: Path):
        from torch.utils.tensorboard import SummaryWriter

        t = cfg.trainer
        self.folder = Path(os.environ.get("TENSORBOARD_DIR") or out / "tensorboard_log" / t.project_name
                           / t.experiment_name).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.folder))  # a new events file per run: never writes over one

    @property
    def where(self) -> str:
        return str(self.folder)

    def log_metrics(self, metrics: dict, step: int) -> None:
        for key, value in _numbers(metrics).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_table(self, rows: list[dict], step: int) -> None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731 (one Markdown table cell)
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
        self.writer.add_text("val/generations", "\n".join(lines), step)

    def finish(self, status: str) -> None:
        self.writer.close()


class JsonlFileLogger:
    name = "file"

    def __init__(self, cfg, out: Path):
        t = cfg.trainer
        path = os.environ.get("VERL_FILE_LOGGER_PATH")
        if not path:
            root = Path(os.environ.get("VERL_FILE_LOGGER_ROOT") or out / "file_log").expanduser()
            path = root / t.project_name / f"{t.experiment_name}.jsonl"
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", buffering=1)  # line-buffered: a killed run keeps every finished line

    @property
    def where(self) -> str:
        return str(self.path)

    def log_metrics(self, metrics: dict, step: int) -> None:
        # Non-finite floats become null (json.dumps would write NaN, which is not JSON).
        data = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, "data": data}, default=str) + "\n")

    def log_table(self, rows: list[dict], step: int) -> None:
        pass  # verl's file logger takes metrics only; the tables are in validation_data_dir's dumps

    def finish(self, status: str) -> None:
        self.file.close()


BACKENDS = {"wandb": WandbLogger, "tensorboard": TensorBoardLogger, "file": JsonlFileLogger}


def open_loggers(cfg, out: str | Path, names: list[str]) -> list:
    """The trackers `names` asks for besides console and MLflow; those already open are closed if one fails."""
    opened = []
    try:
        for name in names:
            if name in BACKENDS:
                opened.append(BACKENDS[name](cfg, Path(out)))
                log.info("%s logger writes to %s", name, opened[-1].where)
    except BaseException:
        for logger in opened:
            logger.finish("FAILED")
        raise
    return opened
