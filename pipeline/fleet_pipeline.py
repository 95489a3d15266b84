"""`pipeline run train-fleet -c fleet.yaml`: stage the base model, train every member of the fleet in one run
(stages/train/fleet), publish each finished member as NAME@V with lineage pointing at the shared run.

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
    outcome = FleetRun(fleet, staged["model_dir"], ctx.stage_dir, resume=resume,
                       start_folders=resolve_start_folders(fleet)).run()
    return outcome


def _publish_fleet(ctx: StageContext) -> dict:
    """Each finished member as a version of its own name; a failed member is listed with its error."""
    from stages.publish import publish
    from stages.train.data import data_fingerprint

    fleet = _fleet(ctx)
    trained = ctx.outputs["train_fleet"]
    uri = ctx.tracking.uri if ctx.tracking is not None else None
    names = [m.name for m in fleet.members]
    out = {}
    for spec in fleet.members:
        member = trained["members"][spec.name]
        if member["status"] != "finished":
            out[spec.name] = {"status": member["status"], "error": member["error"], "ref": None}
            continue
        cfg = spec.cfg.model_copy(deep=True)
        cfg.publish.name = spec.name
        train = {"adapter_dir": member["adapter_dir"], "steps": trained["steps"], "config_digest": cfg.digest(),
                 "data_fingerprint": data_fingerprint(cfg.data.train_files),
                 "start_adapter": {"path": spec.start_adapter} if spec.start_adapter else {}}
        before, after = member.get("val_reward_before"), member.get("val_reward_after")
        evaluation = {"publish": True, "decision": "fleet member finished training (no gate for fleets yet)",
                      "start_reward": before, "adapter_reward": after,
                      "improvement": after - before if before is not None and after is not None else None}
        fleet_lineage = {"fleet": {"run": ctx.run_dir.name, "members": names, "member": spec.name,
                                   "metrics": member["metrics"]}}
        published = publish(cfg, ctx.run_dir.name, ctx.outputs["stage_model"], train, evaluation,
                            mlflow_tracking_uri=uri, extra_lineage=fleet_lineage)
        out[spec.name] = {"status": "published", "error": None, "ref": published["ref"],
                          "version": published["version"], "path": published["path"]}
    return {"members": out, "published": [o["ref"] for o in out.values() if o["ref"]]}


TRAIN_FLEET = Stage("train_fleet", _train_fleet, "RL-train every member of the fleet at once: one actor, one "
                    "rollout engine (stages/train/fleet)")
PUBLISH_FLEET = Stage("publish_fleet", _publish_fleet, "store each finished member as a new registry version "
                      "with lineage to the shared run")


def fleet_pipeline(stage_model: Stage) -> Pipeline:
    return Pipeline("train-fleet", [stage_model, TRAIN_FLEET, PUBLISH_FLEET],
                    "stage the base model -> train a fleet of adapters in one run -> publish each finished member")
