"""Runs a pipeline's stages in order inside a run directory, with a manifest written after every stage.

The manifest (`manifest.json`) holds, per stage: status (pending, running, succeeded, failed, interrupted),
start and end times, outputs and error. `--resume RUN_DIR` re-reads the run's saved config and skips the
stages that succeeded; a stage marked `rerun_on_resume` (cheap, and its outputs may not survive the
process, like a /dev/shm copy) runs again. Cleanups registered by stages run when the pipeline ends,
whether it succeeded, failed or was interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional


from config import Config, load_config
from ground.errors import PipelineError, StageError
from ground.logs import console_log
from ground.mlflow_uri import redact_text
from ground.new_files import refuse_registry_folder, write_new_text

log = logging.getLogger(__name__)


def load_run_config(config_file=None, overrides=None) -> Config:
    """`load_config` plus every check of a name that lives in a registry of components (advantage estimator,
    policy loss, aggregation mode, KL type, reward scorer), so a typo fails before a run directory exists."""
    from stages.train.core_algos import check_algorithm_names

    cfg = load_config(config_file, list(overrides or []))
    check_algorithm_names(cfg)
    return cfg

MANIFEST = "manifest.json"
CONFIG_FILE = "config.yaml"


@dataclass
class StageContext:
    """What a stage gets: the config, its own folder, and the outputs of the stages before it."""

    config: Config
    run_dir: Path
    stage_name: str
    outputs: dict[str, dict[str, Any]]
    tracking: Any = None  # the pipeline's tracking handle (MLflow parent run), when tracking is on

    @property
    def stage_dir(self) -> Path:
        d = self.run_dir / self.stage_name
        d.mkdir(parents=True, exist_ok=True)
        return d


@dataclass
class Stage:
    name: str
    run: Callable[[StageContext], dict[str, Any]]
    description: str = ""
    cleanup: Optional[Callable[[dict[str, Any]], None]] = None
    rerun_on_resume: bool = False
    # A stage that opens its own MLflow run under the pipeline's parent run (training logs per-step metrics
    # from its own process) gets no nested run from the runner.
    own_tracking: bool = False
    # A cheap check of the config that this stage runs again itself, run by `Pipeline.check` before the run
    # directory is made and any stage starts: a missing data file should not cost a model staging first.
    check: Optional[Callable[[Config], None]] = None


@dataclass
class Pipeline:
    name: str
    stages: list[Stage]
    description: str = ""

    def check(self, config: Config) -> None:
        """Run every stage's `check` (raises the first PipelineError)."""
        for stage in self.stages:
            if stage.check is not None:
                stage.check(config)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)  # a reader (or a crash) sees the old manifest or the new one, never half of one


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise PipelineError(f"`{run_dir}` is not a run directory: it has no {MANIFEST}. Pass a folder under ./runs/.")
    return json.loads(path.read_text())


@dataclass
class Run:
    pipeline: Pipeline
    config: Config
    run_dir: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, pipeline: Pipeline, config: Config, run_dir: Path | None = None) -> "Run":
        if run_dir is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            run_dir = Path("runs") / f"{pipeline.name}-{stamp}-{os.getpid()}"
        run_dir = Path(run_dir)
        refuse_registry_folder(run_dir, "--run-dir")  # its stages' outputs and checkpoints all go under it
        if (run_dir / MANIFEST).exists():
            raise PipelineError(f"`{run_dir}` already holds a run. Use --resume {run_dir} to continue it, or another --run-dir.")
        # A run writes config.yaml, manifest.json, report.md, curves and stage folders into its directory: only
        # a new or empty folder is taken, so none of those can land on a file the user keeps there.
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise PipelineError(f"--run-dir `{run_dir}` already exists and is not an empty folder (nor a run to "
                                "--resume); a run writes config.yaml, manifest.json, report.md and stage folders "
                                "into it. Choose a new --run-dir.")
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            write_new_text(run_dir / CONFIG_FILE, config.to_yaml())
        except FileExistsError:  # another process took the folder meanwhile
            raise PipelineError(f"--run-dir `{run_dir}` was taken by another process meanwhile; choose another.") from None
        manifest = {
            "run_id": run_dir.name,
            "pipeline": pipeline.name,
            "created": _now(),
            "config_digest": config.digest(),
            "status": "pending",
            "stages": [{"name": s.name, "status": "pending"} for s in pipeline.stages],
        }
        run = cls(pipeline, config, run_dir, manifest)
        run.save()
        return run

    @classmethod
    def resume(cls, pipelines: dict[str, Pipeline], run_dir: str | Path) -> "Run":
        run_dir = Path(run_dir)
        manifest = read_manifest(run_dir)
        pipeline = pipelines.get(manifest["pipeline"])
        if pipeline is None:
            raise PipelineError(f"Run `{run_dir}` is of unknown pipeline `{manifest['pipeline']}`.")
        config = load_config(run_dir / CONFIG_FILE)
        known = {s["name"] for s in manifest["stages"]}
        for stage in pipeline.stages:  # stages added to the pipeline since the run started
            if stage.name not in known:
                manifest["stages"].append({"name": stage.name, "status": "pending"})
        return cls(pipeline, config, run_dir, manifest)

    def save(self) -> None:
        write_json_atomic(self.run_dir / MANIFEST, self.manifest)

    def _entry(self, name: str) -> dict[str, Any]:
        return next(e for e in self.manifest["stages"] if e["name"] == name)

    def outputs(self) -> dict[str, dict[str, Any]]:
        return {e["name"]: e.get("outputs", {}) for e in self.manifest["stages"] if e["status"] == "succeeded"}

    def execute(self, tracking_factory: Callable[["Run"], Any] | None = None) -> dict[str, Any]:
        """Run every unfinished stage in order. Raises on failure after recording it."""
        self.manifest["status"] = "running"
        self.manifest.setdefault("attempts", []).append(_now())
        self.save()
        cleanups: list[tuple[Stage, dict[str, Any]]] = []
        tracking = tracking_factory(self) if tracking_factory else None
        status = "failed"
        try:
            for stage in self.pipeline.stages:
                entry = self._entry(stage.name)
                if entry["status"] == "succeeded" and not stage.rerun_on_resume:
                    console_log("stage %s: already succeeded, skipped", stage.name)
                    continue
                self._run_stage(stage, entry, tracking)
                if stage.cleanup:
                    cleanups.append((stage, entry["outputs"]))
            status = "succeeded"
            return self.outputs()
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            for stage, outputs in reversed(cleanups):
                try:
                    stage.cleanup(outputs)
                except Exception:  # a failed cleanup must not hide the stage's own error
                    log.exception("cleanup of stage %s failed", stage.name)
            self.manifest["status"] = status
            self.manifest["ended"] = _now()
            self.save()
            if tracking is not None and hasattr(tracking, "close"):
                tracking.close(status)

    def _run_stage(self, stage: Stage, entry: dict[str, Any], tracking: Any) -> None:
        entry.update(status="running", started=_now(), ended=None, error=None)
        entry.pop("outputs", None)
        self.save()
        t0 = time.monotonic()
        ctx = StageContext(self.config, self.run_dir, stage.name, self.outputs(), tracking)
        stage_run_id = tracking.start_stage(stage.name) if tracking is not None and not stage.own_tracking else None
        if stage_run_id:
            entry["mlflow_run_id"] = stage_run_id
        console_log("stage %s: started", stage.name)
        try:
            outputs = stage.run(ctx) or {}
        except BaseException as exc:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            if isinstance(exc, KeyboardInterrupt):
                error = "interrupted (Ctrl-C or SIGINT)"
            elif isinstance(exc, PipelineError):
                error = redact_text(str(exc))  # the manifest is a file a run keeps: no URI secret in it
            else:
                error = redact_text(f"{type(exc).__name__}: {exc}")
                entry["traceback"] = redact_text(traceback.format_exc(limit=20))
            entry.update(status=status, ended=_now(), error=error)
            self.save()
            if tracking is not None:
                tracking.end_stage(stage_run_id, status)
            if isinstance(exc, (KeyboardInterrupt, PipelineError)) or not isinstance(exc, Exception):
                raise
            raise StageError(f"stage {stage.name} failed: {error} (details in {self.run_dir / MANIFEST})") from exc
        entry.update(status="succeeded", ended=_now(), seconds=round(time.monotonic() - t0, 2), outputs=outputs)
        self.save()
        if tracking is not None:
            tracking.end_stage(stage_run_id, "succeeded", outputs)
        console_log("stage %s: succeeded in %.1f s", stage.name, time.monotonic() - t0)
