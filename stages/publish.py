"""Stage 3: publish the trained adapter to the registry as a new immutable version, with its lineage.

Idempotent per pipeline run: a resumed run whose earlier attempt already stored a version (and then died
before the manifest said so) finds it by its `run_id` lineage and does not publish twice.
"""

from __future__ import annotations

import logging

from config import Config
from ground.logs import console_log
from stages.train.tools.lineage import multi_turn_lineage

log = logging.getLogger(__name__)


def publish(cfg: Config, run_id: str, staged: dict, train: dict, evaluation: dict,
            mlflow_tracking_uri: str | None = None) -> dict:
    if not evaluation.get("publish"):
        console_log("Not publishing: %s", evaluation.get("decision"))
        return {"published": False, "ref": None, "reason": evaluation.get("decision")}
    from registry import open_registry

    reg = open_registry(cfg.registry.uri, mlflow_tracking_uri=mlflow_tracking_uri,
                        mirror_mlflow=mlflow_tracking_uri is not None)
    name = cfg.publish.name
    if name in reg.list_adapters():
        for version in reg.list_versions(name):
            if version.metadata.get("lineage", {}).get("run_id") == run_id:
                log.info("Run %s already published %s; not publishing again", run_id, version.ref)
                if cfg.publish.alias:
                    reg.set_alias(name, cfg.publish.alias, version.version)
                return _outputs(version, reg, cfg)
    lineage = {
        "run_id": run_id,
        "mlflow_run_id": train.get("mlflow_run_id"),
        "algorithm": cfg.algorithm.adv_estimator,
        "config_digest": train.get("config_digest") or cfg.digest(),
        "data_fingerprint": train.get("data_fingerprint"),
        "data_files": {"train": cfg.data.train_files, "val": cfg.data.val_files},
        "base_model": cfg.actor_rollout_ref.model.path,
        "steps": train.get("steps"),
        "decision": evaluation.get("decision"),
    }
    multi_turn = multi_turn_lineage(cfg.actor_rollout_ref.rollout.multi_turn)
    if multi_turn:  # the tools (names, schemas) and multi_turn settings the adapter learned to call
        lineage["multi_turn"] = multi_turn
    parent = None
    start = train.get("start_adapter") or {}
    if start.get("ref"):  # trained from a registry version: the reference as configured and the version pinned
        lineage["start_adapter"] = {k: start[k] for k in ("reference", "ref", "registry", "weights_sha256")}
        parent = start["version"] if start["name"] == cfg.publish.name else start["ref"]
    elif start.get("path"):
        lineage["start_adapter"] = {"path": start["path"]}
    metrics = {k: evaluation[k] for k in ("start_reward", "adapter_reward", "improvement", "start_acc", "adapter_acc")
               if evaluation.get(k) is not None}
    version = reg.publish(
        train["adapter_dir"], name, base_dir=staged["source_dir"], base_fingerprint=staged["fingerprint"],
        alias=cfg.publish.alias, tags=dict(cfg.publish.tags), lineage=lineage, metrics=metrics,
        parent_version=parent,
    )
    return _outputs(version, reg, cfg)


def _outputs(version, reg, cfg: Config) -> dict:
    return {
        "published": True,
        "ref": version.ref,
        "name": version.name,
        "version": version.version,
        "alias": cfg.publish.alias,
        "path": str(version.path),
        "registry": reg.uri,
    }
