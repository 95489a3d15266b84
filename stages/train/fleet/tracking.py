"""MLflow for a fleet run (issue #28): the fleet is one MLflow run and every member a child run of it.

    tracking = FleetTracking(cfg, specs, parent_run_id=..., saved=state.get("mlflow"), out_dir=out)
    tracking.log_entry({"step": 3, "timing/step": 29.1, "members/add/reward/mean": 0.4, ...})
    tracking.end_member("add", "finished", None); tracking.close("FINISHED")

The fleet run is what the single path's train stage is (stages/train/tracking.TrainTracking: nested under the
pipeline's parent run, every shared config key as a parameter, `trainer.logger`'s other trackers alongside),
and holds the fleet-wide metrics (timing/*, members/live). Each member's child run (tagged `member`, and at the
end `status` and, for a failed member, `error`) gets that member's `members/<name>/...` metrics under the keys
the single path uses (reward/mean, actor/pg_loss, val/reward, ...), so a member's curves read like a single
run's; its parameters are the config keys where it differs from the shared config (its data, reward, rank...).
Without `mlflow` in `trainer.logger` nothing goes to MLflow, as on the single path; the other trackers get every
metric under its history key. The run ids are kept in the checkpoint (`state()`), so `--resume` continues them.
"""

from __future__ import annotations

import logging
import math
import time

from ground.mlflow_uri import param_text

log = logging.getLogger(__name__)

MEMBER_PREFIX = "members/"
# a member's child run ends with the MLflow status of the member's own outcome
MEMBER_STATUS = {"finished": "FINISHED", "failed": "FAILED", "stopped": "KILLED", "running": "KILLED"}


class FleetTracking:
    def __init__(self, cfg, specs, parent_run_id: str | None = None, saved: dict | None = None,
                 out_dir: str | None = None):
        """cfg: the shared config; specs: the fleet's MemberSpecs; saved: `state()` of the checkpoint resumed."""
        from stages.train.tracking import TrainTracking

        saved = saved or {}
        self.fleet = TrainTracking(cfg, parent_run_id=parent_run_id, resume_run_id=saved.get("run_id"),
                                   out_dir=out_dir)
        self.names = [s.name for s in specs]
        self.member_runs: dict[str, str] = {}
        self.open_members: set[str] = set()
        self.closed = False
        if not self.fleet.enabled:
            return
        self.client = self.fleet.client
        self.fleet.set_tags({"fleet_members": ",".join(s.name for s in specs)})
        experiment_id = self.client.get_run(self.fleet.run_id).info.experiment_id
        shared = cfg.flat()
        saved_members = saved.get("members") or {}
        for spec in specs:
            run_id = saved_members.get(spec.name)
            if run_id and self.fleet._exists(run_id):  # --resume: the member's run goes on
                self.client.update_run(run_id, status="RUNNING")
            else:
                run_id = self._start_member(experiment_id, spec, shared)
            self.member_runs[spec.name] = run_id
            self.open_members.add(spec.name)

    @property
    def enabled(self) -> bool:
        return self.fleet.enabled

    @property
    def run_id(self) -> str | None:
        return self.fleet.run_id

    @property
    def destinations(self) -> dict:
        return self.fleet.destinations

    def _start_member(self, experiment_id: str, spec, shared: dict) -> str:
        from mlflow.entities import Param

        from ground.mlflow_uri import PARENT_TAG

        run = self.client.create_run(experiment_id, run_name=spec.name, tags={
            PARENT_TAG: self.fleet.run_id, "stage": "train_fleet_member", "member": spec.name,
            "status": "running", "config_digest": spec.cfg.digest()})
        own = [Param(k, param_text(v)) for k, v in spec.cfg.flat().items() if shared.get(k) != v]
        for start in range(0, len(own), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run.info.run_id, params=own[start : start + 100])
        return run.info.run_id

    def state(self) -> dict:
        """What a checkpoint keeps so that --resume continues the same runs."""
        return {"run_id": self.fleet.run_id, "members": dict(self.member_runs)}

    # ------------------------------------------------------------------------------------------- metrics
    def split(self, metrics: dict) -> tuple[dict, dict[str, dict]]:
        """(fleet-wide metrics, {member: its metrics under the single path's keys}) of one history entry."""
        fleet, members = {}, {}
        for key, value in metrics.items():
            if key == "step":
                continue
            parts = key.split("/", 2)
            if len(parts) == 3 and parts[0] + "/" == MEMBER_PREFIX and parts[1] in self.names:
                members.setdefault(parts[1], {})[parts[2]] = value
            else:
                fleet[key] = value
        return fleet, members

    def log_entry(self, entry: dict) -> None:
        """One history entry: the other trackers get it whole; MLflow splits it between the fleet and its members."""
        step = int(entry["step"])
        metrics = {k: v for k, v in entry.items() if k != "step"}
        for logger in self.fleet.others:
            logger.log_metrics(metrics, step)
        if not self.enabled:
            return
        fleet, members = self.split(metrics)
        _log_batch(self.client, self.fleet.run_id, fleet, step)
        for name, own in members.items():
            _log_batch(self.client, self.member_runs[name], own, step)

    def log_member_artifacts(self, name: str, local_dir: str, artifact_path: str = "adapter") -> None:
        if self.enabled and name in self.member_runs:
            self.client.log_artifacts(self.member_runs[name], local_dir, artifact_path)

    # ---------------------------------------------------------------------------------------------- end
    def end_member(self, name: str, status: str, error: dict | None) -> None:
        """Tag the member's outcome (status; `error`: type, message, step) and end its child run."""
        if not self.enabled or name not in self.open_members:
            return
        run_id = self.member_runs[name]
        self.client.set_tag(run_id, "status", status)
        if error:
            self.client.set_tag(run_id, "error", param_text(f"{error.get('type')} at step {error.get('step')}: "
                                                            f"{error.get('message')}"))
        self.client.set_terminated(run_id, MEMBER_STATUS.get(status, "FAILED"))
        self.open_members.discard(name)

    def close(self, status: str) -> None:
        """End the fleet run (and any member run still open) with `status` (FINISHED, FAILED, KILLED); once."""
        if self.closed:
            return
        self.closed = True
        if self.enabled:
            for name in sorted(self.open_members):  # left open only when the run broke off
                self.client.set_terminated(self.member_runs[name], status)
            self.open_members.clear()
        self.fleet.end(status)


def _log_batch(client, run_id: str, metrics: dict, step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    rows = [Metric(_key(k), float(v), now, step) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    for start in range(0, len(rows), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=rows[start : start + 1000])


def _key(key: str) -> str:
    # MLflow keys allow letters, digits, _ - . / and spaces; ours use only those, but a member name is the user's
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def record_gate(tracking_uri: str | None, run_id: str | None, evaluation: dict, ref: str | None) -> None:
    """A member's publish decision on its child run: start/adapter reward and improvement as metrics, the
    decision and the published reference as tags (the single path logs these on the pipeline's parent run)."""
    if not tracking_uri or not run_id:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for key in ("start_reward", "adapter_reward", "improvement"):
        if evaluation.get(key) is not None:
            client.log_metric(run_id, key, float(evaluation[key]))
    client.set_tag(run_id, "decision", param_text(evaluation.get("decision")))
    client.set_tag(run_id, "published_ref", ref or "-")
