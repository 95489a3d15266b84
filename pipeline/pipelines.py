"""The known pipelines and their stages.

Each stage adapts one entry point of `stages/` to the runner: it takes the config and the outputs of the
stages before it and returns its own outputs. Stages do not import each other; this module wires them.
"""

from __future__ import annotations

from pipeline.fleet_pipeline import fleet_pipeline
from pipeline.runner import Pipeline, Stage, StageContext


def _stage_model(ctx: StageContext) -> dict:
    from stages.stage_model import stage_model

    return stage_model(ctx.config)


def _cleanup_staged_model(outputs: dict) -> None:
    from stages.stage_model import cleanup

    cleanup(outputs)


STAGE_MODEL = Stage(
    "stage_model",
    _stage_model,
    "resolve the base model (folder, Hub repo or packaged default), copy to /dev/shm if use_shm, fingerprint",
    cleanup=_cleanup_staged_model,
    # Its /dev/shm copy is removed when a pipeline ends, so a resumed run stages again (reusing the cached
    # conversion; the copy is cheap).
    rerun_on_resume=True,
)

def _train(ctx: StageContext) -> dict:
    from stages.start_adapter import resolve_start_adapter, with_start_folder
    from stages.train import train

    staged = ctx.outputs["stage_model"]
    parent = ctx.tracking.parent_run_id if ctx.tracking is not None else None
    # A registry reference in lora_adapter_path becomes a verified local folder here, pinned in the stage folder
    # so that a resumed run starts from the same version even if the alias has moved meanwhile.
    start = resolve_start_adapter(ctx.config, pin_dir=ctx.stage_dir)
    # Checkpoints live in the run directory, so `--resume RUN_DIR` continues from this run's latest one and
    # a new run never picks up another run's (verl's shared default_local_dir would).
    cfg = with_start_folder(ctx.config, start).model_copy(deep=True)
    cfg.trainer.default_local_dir = str(ctx.stage_dir / "checkpoints")
    # The stage folder is this run's own (the run directory was new), so a rerun after a failure may replace it.
    outputs = train(cfg, staged["model_dir"], staged["fingerprint"], out_dir=str(ctx.stage_dir),
                    parent_run_id=parent, replace_outputs=True)
    return {**outputs, "start_adapter": start}


def _check_train(config) -> None:
    from config.inert import warn_replaced_local_dir
    from stages.start_adapter import check_start_adapter
    from stages.train.prepare_data import ensure_data

    warn_replaced_local_dir(config, "the run directory's train/checkpoints")  # _train sets it there
    ensure_data(config)  # the demo's files are written here when missing; a user's missing file is an error
    check_start_adapter(config)  # a reference that resolves nowhere fails before the run directory exists


def _evaluate(ctx: StageContext) -> dict:
    from stages.evaluate import evaluate

    result = evaluate(ctx.config, ctx.outputs["train"])
    if ctx.tracking is not None:
        ctx.tracking.log_metrics({k: result[k] for k in ("start_reward", "adapter_reward", "improvement")
                                  if result.get(k) is not None})
    return result


def _publish(ctx: StageContext) -> dict:
    from stages.publish import publish

    uri = ctx.tracking.uri if ctx.tracking is not None else None
    return publish(ctx.config, ctx.run_dir.name, ctx.outputs["stage_model"], ctx.outputs["train"],
                   ctx.outputs["evaluate"], mlflow_tracking_uri=uri)


def _serve(ctx: StageContext) -> dict:
    from stages.serve_stage import serve_published

    return serve_published(ctx.config, ctx.outputs["stage_model"], ctx.outputs["publish"], ctx.stage_dir)


TRAIN = Stage("train", _train, "RL-train a LoRA adapter: FSDP2 actor on Ray workers, vLLM rollouts, MLflow",
              own_tracking=True, check=_check_train)
EVALUATE = Stage("evaluate", _evaluate, "compare base and adapter validation reward; decide whether to publish")
PUBLISH = Stage("publish", _publish, "store the adapter as a new immutable registry version with lineage")
SERVE = Stage("serve", _serve, "when serve.enable: serve the published version behind the multi-adapter endpoint")

PIPELINES: dict[str, Pipeline] = {
    "train-and-publish": Pipeline(
        "train-and-publish",
        [STAGE_MODEL, TRAIN, EVALUATE, PUBLISH, SERVE],
        "stage the base model -> train a LoRA adapter with RL -> evaluate -> publish -> (optionally) serve",
    ),
    "stage-model": Pipeline("stage-model", [STAGE_MODEL], "stage the base model only"),
    "train": Pipeline("train", [STAGE_MODEL, TRAIN], "stage the base model -> train (no publishing)"),
    # many adapters in one run; its -c is a fleet YAML (pipeline/fleet_pipeline.py)
    "train-fleet": fleet_pipeline(STAGE_MODEL),
}
