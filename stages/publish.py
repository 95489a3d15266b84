"""Stage 3: publish the trained adapter to the registry as a new immutable version, with its lineage.

Idempotent per pipeline run: a resumed run whose earlier attempt already stored a version (and then died
before the manifest said so) finds it by its `run_id` lineage and does not publish twice.

As a canary (`publish.alias=canary publish.canary_weight=10`): the new version gets the alias and the name's
route becomes `prod=90 canary=10`, so a tenth of the bare name's traffic reaches it until `pipeline promote`
moves prod to it (or a rollback takes it out). Without a `prod` alias there is nothing to split against: the
alias is set, and the log says why no route was.
"""

from __future__ import annotations

import logging

from config import Config
from ground.capture_dataset import capture_lineage
from ground.logs import console_log
from stages.train.tools.lineage import multi_turn_lineage

log = logging.getLogger(__name__)

STABLE_ALIAS = "prod"  # the alias a canary shares its name's traffic with


def publish(cfg: Config, run_id: str, staged: dict, train: dict, evaluation: dict,
            mlflow_tracking_uri: str | None = None, extra_lineage: dict | None = None) -> dict:
    """extra_lineage: more lineage fields (a fleet member's `fleet`: the shared run and its members)."""
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
                return _outputs(version, reg, cfg, _canary_route(reg, cfg))
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
        # what `pipeline promote`'s held-out gate needs to score this version as its training's validation did
        "reward": {"scorer": cfg.reward_model.scorer,
                   "custom_reward_function": ({"path": cfg.custom_reward_function.path,
                                               "name": cfg.custom_reward_function.name}
                                              if cfg.custom_reward_function.path else None)},
        "max_response_length": cfg.data.max_response_length,
    }
    lineage.update(extra_lineage or {})
    captured = capture_lineage(cfg.data.train_files)
    if captured:  # trained on `pipeline data from-serving` output: back to the capture, its window and counts
        lineage["capture_datasets"] = captured
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
    return _outputs(version, reg, cfg, _canary_route(reg, cfg))


def _canary_route(reg, cfg: Config) -> str | None:
    """With publish.canary_weight: route the name prod=100-w ALIAS=w; returns the route as text (None: none)."""
    weight, alias, name = cfg.publish.canary_weight, cfg.publish.alias, cfg.publish.name
    if weight is None:
        return None
    if STABLE_ALIAS not in reg.aliases(name):
        console_log("Published as `%s@%s` without a traffic split: `%s` has no `%s` alias to split against "
                    "(publish.canary_weight=%d). Point `%s` at a version (pipeline registry alias set %s %s V) "
                    "and set the route with `pipeline registry route set %s %s=%d %s=%d`.", name, alias, name,
                    STABLE_ALIAS, weight, STABLE_ALIAS, name, STABLE_ALIAS, name, STABLE_ALIAS, 100 - weight,
                    alias, weight)
        return None
    route = reg.set_route(name, {STABLE_ALIAS: 100 - weight, alias: weight},
                          reason=f"publish.canary_weight={weight}: the new version takes {weight}% as `{alias}`")
    text = " ".join(f"{target}={w}" for target, w in route.targets)
    console_log("Route of `%s`: %s (a canary; `pipeline promote %s --candidate %s --to %s` when it holds up)",
                name, text, name, alias, STABLE_ALIAS)
    return text


def _outputs(version, reg, cfg: Config, route: str | None = None) -> dict:
    return {
        "published": True,
        "ref": version.ref,
        "name": version.name,
        "version": version.version,
        "alias": cfg.publish.alias,
        "path": str(version.path),
        "registry": reg.uri,
        "route": route,
    }
