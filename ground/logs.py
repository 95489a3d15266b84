"""Where log records go: a short console for people, a full log file for when something needs explaining.

The console shows what a person running a job wants to follow: records logged through `console_log` (one line
per stage, validation results, the published reference), warnings and errors of our own packages, and errors
of anything else. Everything else, INFO from our modules and whatever vLLM, Ray and MLflow say (including
Python `warnings`, routed through logging), goes to the log file only: `runs/<run>/pipeline.log` for a
pipeline run. `-v` shows everything on the console too.

Processes that Ray starts (actor workers, the rollout engine and its engine-core subprocess) write to their own
stdout/stderr, which Ray would copy to the driver's console. `redirect_process_output()` sends a process's
output, and that of the processes it starts, to the run's log file instead.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

# Set only in the runtime environment of the Ray job a run starts (never in the driver's own environment, so
# no other child process of the driver, nor a later run in the same process, picks it up).
WORKER_LOG_FILE_ENV = "PIPELINE_WORKER_LOG_FILE"
OUR_PACKAGES = ("ground", "config", "registry", "stages", "serve", "pipeline")
CONSOLE_LOGGER = "console"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def console_log(message: str, *args) -> None:
    """An INFO line meant for the person at the console (and the log file)."""
    logging.getLogger(CONSOLE_LOGGER).info(message, *args)


class _ConsoleHandler(logging.StreamHandler):
    """Writes through tqdm, so a line logged while a progress bar is drawn lands above the bar, not inside it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


class _ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == CONSOLE_LOGGER or record.levelno >= logging.ERROR:
            return True
        ours = record.name.split(".", 1)[0] in OUR_PACKAGES
        return ours and record.levelno >= logging.WARNING


# Libraries that give their loggers a console handler of their own (and stop propagation), which would bypass
# ours: their records are sent through the root logger instead, to the run's log file.
LIBRARY_LOGGERS = ("ray", "mlflow", "vllm")


def console_is_ours() -> bool:
    return any(getattr(h, "_pipeline_console", False) for h in logging.getLogger().handlers)


def adopt_library_loggers() -> None:
    """Once `setup_logging` owns the console: make the loggers of Ray, MLflow and vLLM (those already imported)
    propagate to the root logger instead of printing through handlers of their own. Call it after importing
    them; outside the CLI (our console handler absent) it changes nothing."""
    if not console_is_ours():
        return
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, logging.StreamHandler)
                        and not isinstance(h, logging.FileHandler)]:
            logger.removeHandler(handler)
        logger.propagate = True


def setup_logging(verbose: bool = False) -> None:
    """Console handler for the CLI: quiet by default (see the module docstring), everything with `verbose`."""
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # MLflow's records reach our handlers instead
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for handler in [h for h in root.handlers if getattr(h, "_pipeline_console", False)]:
        root.removeHandler(handler)
    console = _ConsoleHandler(sys.stderr)
    console._pipeline_console = True
    if verbose:
        console.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    else:
        console.setFormatter(logging.Formatter("%(message)s"))
        console.addFilter(_ConsoleFilter())
    root.addHandler(console)
    logging.captureWarnings(True)  # library deprecation warnings become records of `py.warnings`: file only
    adopt_library_loggers()


def log_to_file(path: str | os.PathLike) -> Path:
    """Append every record (INFO and up; DEBUG when the root logger is at DEBUG) to `path`; the Ray actors of a
    run started from here write their output there too (see `worker_log_env`)."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_pipeline_file", False)]:  # one run's file at a time
        root.removeHandler(old)
        old.close()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler._pipeline_file = True
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    root.addHandler(handler)
    return path


def worker_log_env() -> dict[str, str]:
    """Environment variables for the processes Ray starts for this run: the run's log file, when there is one."""
    files = [h.baseFilename for h in logging.getLogger().handlers if getattr(h, "_pipeline_file", False)]
    return {WORKER_LOG_FILE_ENV: files[-1]} if files else {}


def redirect_process_output(prefix: str) -> None:
    """In a process started by Ray for a run: send stdout and stderr (file descriptors 1 and 2, so child
    processes and C libraries follow) to the run's log file, and log this process's records there with `prefix`.
    Does nothing where the run set no log file (a plain `ray.init`, or the class used outside Ray)."""
    path = os.environ.get(WORKER_LOG_FILE_ENV)
    if not path:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)  # O_APPEND: writers never overwrite
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{prefix}] %(name)s: %(message)s",
                                           datefmt="%Y-%m-%d %H:%M:%S"))
    root.addHandler(handler)
    logging.captureWarnings(True)
    logging.getLogger(__name__).info("process %d (%s) writes its output here", os.getpid(), prefix)
