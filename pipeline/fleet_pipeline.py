"""`pipeline run train-fleet -c fleet.yaml`: stage the base model, train every member of the fleet in one run
(stages/train/fleet), then per finished member the single path's publish gate (stages/evaluate.py on its own
held-out reward before and after, against its publish.min_improvement) and, when it passes, publish it as NAME@V
with lineage pointing at the shared run and at the member's MLflow child run.

The run directory keeps the fleet as it was asked (`fleet.yaml`: the shared config with the command line's
overrides applied, plus `fleet.members`), next to the runner's `config.yaml` (the shared config alone), so that
`--resume RUN_DIR` trains and publishes the same members: the train stage continues from its checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from config import Config
from ground.errors import ConfigError
from pipeline.runner import Pipeline, Stage, StageContext

FLEET_FILE = "fleet.yaml"


def load_fleet_for_run(config_file: str | None, overrides) -> tuple[Config, callable]:
    """(the shared config for the runner, a function that writes the fleet into the new run directory)."""
    from config import read_yaml
    from pipeline.fleet_train import check_member_names
    from stages.train.core_algos import check_algorithm_names
    from stages.train.fleet.config import parse_fleet

    if not config_file:
        raise ConfigError("pipeline run train-fleet needs -c FLEET.yaml: the shared config plus fleet.members "
                          "(see examples/fleet/fleet.yaml).")
    fleet = parse_fleet(config_file, list(overrides or []))
    check_member_names(fleet)
    check_algorithm_names(fleet.shared)
    members = read_yaml(config_file)["fleet"]

    def keep(run_dir: Path) -> None:
        doc = {**fleet.shared.to_dict(), "fleet": members}
        (Path(run_dir) / FLEET_FILE).write_text(yaml.safe_dump(doc, sort_keys=False))

    return fleet.shared, keep


def _fleet(ctx: StageContext):
    from stages.train.fleet.config import parse_fleet

    return parse_fleet(ctx.run_dir / FLEET_FILE)


def _train_fleet(ctx: StageContext) -> dict:
    from pipeline.fleet_train import resolve_start_folders
    from stages.train import checkpoint
    from stages.train.fleet.recipe import FleetRun

    fleet = _fleet(ctx)
    staged = ctx.outputs["stage_model"]
    resume = bool(checkpoint.all_steps(ctx.stage_dir / "checkpoints"))  # a resumed pipeline run continues
    parent = ctx.tracking.parent_run_id if ctx.tracking is not None else None  # the fleet's run nests under it
    outcome = FleetRun(fleet, staged["model_dir"], ctx.stage_dir, resume=resume,
                       start_folders=resolve_start_folders(fleet), parent_run_id=parent).run()
    return outcome


def gate_member(cfg, member: dict) -> dict:
    """The single path's evaluate stage for one finished member: its own val reward before/after against its
    publish.min_improvement. A member that cannot be compared (no reward before) is not published, with the
    reason as its decision, instead of failing the whole fleet's publishing."""
    from ground.errors import StageError
    from stages.evaluate import evaluate

    outputs = {k: member.get(k) for k in ("val_reward_before", "val_reward_after", "val_acc_before", "val_acc_after")}
    try:
        return evaluate(cfg, outputs)
    except StageError as exc:
        return {"publish": False, "decision": f"skip: {exc}", "start_reward": outputs["val_reward_before"],
                "adapter_reward": outputs["val_reward_after"], "improvement": None,
                "min_improvement": cfg.publish.min_improvement}


def _publish_fleet(ctx: StageContext) -> dict:
    """Each finished member that passes its gate as a version of its own name; a refused member is listed with the
    gate's decision, a failed one with its error."""
    from stages.publish import publish
    from stages.train.data import data_fingerprint
    from stages.train.fleet.tracking import record_gate

    fleet = _fleet(ctx)
    trained = ctx.outputs["train_fleet"]
    uri = ctx.tracking.uri if ctx.tracking is not None else None
    names = [m.name for m in fleet.members]
    out = {}
    for spec in fleet.members:
        member = trained["members"][spec.name]
        if member["status"] != "finished":
            out[spec.name] = {"status": member["status"], "error": member["error"], "ref": None, "decision": None}
            continue
        cfg = spec.cfg.model_copy(deep=True)
        cfg.publish.name = spec.name
        evaluation = gate_member(cfg, member)
        if not evaluation["publish"]:
            record_gate(uri, member.get("mlflow_run_id"), evaluation, None)
            out[spec.name] = {"status": "not_published", "error": None, "ref": None,
                              "decision": evaluation["decision"], "evaluation": evaluation}
            continue
        train = {"adapter_dir": member["adapter_dir"], "steps": trained["steps"], "config_digest": cfg.digest(),
                 "data_fingerprint": data_fingerprint(cfg.data.train_files),
                 "start_adapter": {"path": spec.start_adapter} if spec.start_adapter else {},
                 "mlflow_run_id": member.get("mlflow_run_id")}  # lineage.mlflow_run_id: the member's own run
        fleet_lineage = {"fleet": {"run": ctx.run_dir.name, "members": names, "member": spec.name,
                                   "metrics": member["metrics"], "mlflow_run_id": trained.get("mlflow_run_id")}}
        published = publish(cfg, ctx.run_dir.name, ctx.outputs["stage_model"], train, evaluation,
                            mlflow_tracking_uri=uri, extra_lineage=fleet_lineage)
        record_gate(uri, member.get("mlflow_run_id"), evaluation, published["ref"])
        out[spec.name] = {"status": "published", "error": None, "ref": published["ref"],
                          "version": published["version"], "path": published["path"],
                          "decision": evaluation["decision"], "evaluation": evaluation}
    return {"members": out, "published": [o["ref"] for o in out.values() if o["ref"]]}


# own_tracking: the fleet's MLflow run is this stage's run, as the single path's train stage's is
TRAIN_FLEET = Stage("train_fleet", _train_fleet, "RL-train every member of the fleet at once: one actor, one "
                    "rollout engine (stages/train/fleet)", own_tracking=True)
PUBLISH_FLEET = Stage("publish_fleet", _publish_fleet, "gate each finished member on its own held-out reward and "
                      "store those that pass as new registry versions with lineage to the shared run")


def fleet_pipeline(stage_model: Stage) -> Pipeline:
    return Pipeline("train-fleet", [stage_model, TRAIN_FLEET, PUBLISH_FLEET],
                    "stage the base model -> train a fleet of adapters in one run -> gate and publish each finished member")
