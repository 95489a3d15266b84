"""The fleet's MLflow runs (stages/train/fleet/tracking.py) without training: real MLflow on sqlite, a parsed
fleet config. A history entry splits between the fleet's run and its members' child runs; a resumed run
continues the same runs; trainer.logger without mlflow writes nothing to MLflow; a member's own
publish.min_improvement parses."""

from __future__ import annotations

import yaml

from stages.train.fleet.config import parse_fleet
from stages.train.fleet.tracking import FleetTracking


def _fleet(tmp_path, logger: list[str]):
    members = [{"name": n, "data": {"train_files": f"{n}/train.parquet", "val_files": f"{n}/test.parquet"}}
               for n in ("add", "sub")]
    members[1]["publish"] = {"min_improvement": 0.5}
    doc = {"trainer": {"logger": logger, "mlflow_tracking_uri": f"sqlite:///{tmp_path}/m.db",
                       "project_name": "fleet-tracking"}, "fleet": {"members": members}}
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(doc))
    return parse_fleet(path)


def test_entries_split_between_the_fleet_and_its_members_and_resume_continues_the_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    fleet = _fleet(tmp_path, ["console", "mlflow"])
    assert [m.cfg.publish.min_improvement for m in fleet.members] == [0.0, 0.5]
    tracking = FleetTracking(fleet.shared, fleet.members, out_dir=str(tmp_path / "out"))
    tracking.log_entry({"step": 1, "timing/step": 2.0, "members/live": 2.0, "members/add/reward/mean": 0.25,
                        "members/sub/actor/pg_loss": -0.5})
    saved = tracking.state()
    tracking.close("FAILED")  # broke off: member runs still open end with the fleet's status
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    assert client.get_run(saved["members"]["add"]).info.status == "FAILED"

    again = FleetTracking(fleet.shared, fleet.members, saved=saved, out_dir=str(tmp_path / "out"))
    assert again.state() == saved  # the same runs go on
    again.log_entry({"step": 2, "members/add/reward/mean": 0.5})
    again.end_member("add", "finished", None)
    again.end_member("sub", "failed", {"type": "RewardError", "message": "boom", "step": 2})
    again.close("FINISHED")

    fleet_run = client.get_run(saved["run_id"])
    assert fleet_run.info.status == "FINISHED"
    assert set(fleet_run.data.metrics) == {"timing/step", "members/live"}
    add, sub = (client.get_run(saved["members"][n]) for n in ("add", "sub"))
    assert [m.value for m in client.get_metric_history(add.info.run_id, "reward/mean")] == [0.25, 0.5]
    assert add.info.status == "FINISHED" and add.data.tags["status"] == "finished"
    assert sub.data.metrics == {"actor/pg_loss": -0.5}
    assert sub.info.status == "FAILED" and sub.data.tags["error"] == "RewardError at step 2: boom"
    assert sub.data.params["publish.min_improvement"] == "0.5"  # its own key, not the shared ones
    assert "publish.min_improvement" not in add.data.params


def test_console_only_writes_nothing_to_mlflow(tmp_path):
    fleet = _fleet(tmp_path, ["console"])
    tracking = FleetTracking(fleet.shared, fleet.members, out_dir=str(tmp_path / "out"))
    assert not tracking.enabled and tracking.run_id is None and tracking.member_runs == {}
    tracking.log_entry({"step": 1, "members/add/reward/mean": 0.25})
    tracking.end_member("add", "finished", None)
    tracking.close("FINISHED")
    assert not (tmp_path / "m.db").exists()
