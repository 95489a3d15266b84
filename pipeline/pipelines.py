"""The known pipelines and their stages.

Each stage adapts one entry point of `stages/` to the runner: it takes the config and the outputs of the
stages before it and returns its own outputs. Stages do not import each other; this module wires them.
"""

from __future__ import annotations

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

PIPELINES: dict[str, Pipeline] = {
    "train-and-publish": Pipeline(
        "train-and-publish",
        [STAGE_MODEL],
        "stage the base model -> train a LoRA adapter with RL -> evaluate -> publish -> (optionally) serve",
    ),
    "stage-model": Pipeline("stage-model", [STAGE_MODEL], "stage the base model only"),
}
