"""`pipeline run train-fleet -c fleet.yaml` on the tiny model, one shared run (one step) of five members: stage,
train them in one run, gate each finished member as the single path's evaluate stage does, publish those that
pass as NAME@V with lineage to the shared run. `add`, `sub` and `spell` pass (publish.min_improvement=-2: a
reward in [0, 1] always beats it) and are published as three versions with distinct lineage, `strict` (spell's
settings) is refused by its own gate (its publish.min_improvement=2 no reward can beat), `broken`'s reward
raises so it fails alone. MLflow is on: the fleet's run nests under the pipeline's parent run
and each member has a child run of it. Real Ray, vLLM CPU engine, FSDP2, MLflow (sqlite), local registry."""

from __future__ import annotations

import pytest
import yaml

from pipeline.cli import cli_entry
from pipeline.runner import read_manifest
from tests.stages.train.fleet_helpers import write_fleet

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

MEMBERS = ("add", "sub", "spell", "strict", "broken")
PUBLISHED = ("add", "sub", "spell")


@pytest.fixture(scope="module")
def fleet_pipeline_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet-pipeline")
    path = write_fleet(tiny_model_dir, root, steps=1)
    doc = yaml.safe_load(path.read_text())
    members = {m["name"]: m for m in doc["fleet"]["members"]}
    members["strict"] = {**members["spell"], "name": "strict", "publish": {"min_improvement": 2.0}}
    doc["fleet"]["members"] = [members[name] for name in MEMBERS]
    path.write_text(yaml.safe_dump(doc))
    store, uri = root / "registry", f"sqlite:///{root}/mlflow.db"
    run_dir = root / "runs" / "fleet-e2e"
    assert cli_entry(["run", "train-fleet", "-c", str(path), "--run-dir", str(run_dir), f"registry.uri={store}",
                      "publish.alias=candidate", "publish.min_improvement=-2", "trainer.logger=[console,mlflow]",
                      f"trainer.mlflow_tracking_uri={uri}", "trainer.project_name=fleet-e2e"]) == 0
    manifest = read_manifest(run_dir)
    stages = {s["name"]: s for s in manifest["stages"]}
    return {"run_dir": run_dir, "store": store, "uri": uri, "manifest": manifest,
            "trained": stages["train_fleet"]["outputs"], "members": stages["publish_fleet"]["outputs"]["members"]}


def test_train_fleet_publishes_each_member_its_gate_passes_with_lineage_to_the_shared_run(fleet_pipeline_run):
    from registry import open_registry

    manifest, members = fleet_pipeline_run["manifest"], fleet_pipeline_run["members"]
    assert manifest["status"] == "succeeded"
    assert [s["name"] for s in manifest["stages"]] == ["stage_model", "train_fleet", "publish_fleet"]
    assert {n: m["status"] for n, m in members.items()} == {"add": "published", "sub": "published",
                                                            "spell": "published", "strict": "not_published",
                                                            "broken": "failed"}
    assert members["broken"]["error"]["type"] == "RewardError" and members["broken"]["ref"] is None

    # the gate: the single path's decision and wording, per member, each against its own min_improvement
    strict = members["strict"]
    assert strict["ref"] is None and strict["evaluation"]["publish"] is False
    assert strict["decision"].startswith("skip: adapter does not beat its start: ")
    assert strict["decision"].endswith("<= publish.min_improvement=2.0; set publish.force=True to publish anyway")
    for name in PUBLISHED:
        assert members[name]["decision"].startswith("publish: adapter beats its start by ")
        assert members[name]["decision"].endswith("> publish.min_improvement=-2.0")

    reg = open_registry(str(fleet_pipeline_run["store"]), mirror_mlflow=False)
    assert sorted(reg.list_adapters()) == sorted(PUBLISHED)
    trained = fleet_pipeline_run["trained"]
    lineages = {}
    for name in PUBLISHED:
        version = reg.resolve(f"{name}@candidate")
        assert version.ref == members[name]["ref"] == f"{name}@1"
        lineage = version.metadata["lineage"]
        assert lineage["run_id"] == "fleet-e2e"
        assert lineage["fleet"]["run"] == "fleet-e2e" and lineage["fleet"]["members"] == list(MEMBERS)
        assert lineage["fleet"]["member"] == name
        # the member's own MLflow child run, and the fleet's run
        assert lineage["mlflow_run_id"] == trained["members"][name]["mlflow_run_id"] is not None
        assert lineage["fleet"]["mlflow_run_id"] == trained["mlflow_run_id"] is not None
        assert lineage["decision"] == members[name]["decision"]  # kept with the version, as the single path does
        lineages[name] = lineage
        # its held-out reward before (the base) and after training, from the fleet's validation
        assert set(version.metadata["metrics"]) >= {"start_reward", "adapter_reward", "improvement"}
    # three versions with distinct lineage: each its own config (rank, alpha, lr, n) and its own MLflow run
    assert len({lineages[n]["config_digest"] for n in PUBLISHED}) == 3
    assert len({lineages[n]["mlflow_run_id"] for n in PUBLISHED}) == 3
    assert (fleet_pipeline_run["run_dir"] / "fleet.yaml").is_file()


def test_the_fleet_is_one_mlflow_run_with_a_child_run_per_member(fleet_pipeline_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(fleet_pipeline_run["uri"])
    manifest, trained = fleet_pipeline_run["manifest"], fleet_pipeline_run["trained"]
    fleet = client.get_run(trained["mlflow_run_id"])
    # nested under the pipeline's parent run, as the single path's train stage is
    assert fleet.data.tags["mlflow.parentRunId"] == manifest["mlflow_parent_run_id"]
    assert fleet.info.status == "FINISHED" and fleet.data.tags["stage"] == "train"
    assert len(fleet.data.params) > 100  # every shared config key
    # fleet-wide timing on the fleet's run; no member's metric there
    assert len(client.get_metric_history(fleet.info.run_id, "timing/step")) == 1
    assert not any(k.startswith("members/") and k != "members/live" for k in fleet.data.metrics)

    children = client.search_runs([fleet.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{fleet.info.run_id}'")
    runs = {c.data.tags["member"]: c for c in children}
    assert sorted(runs) == sorted(MEMBERS)  # one child run per member
    assert {n: r.info.run_id for n, r in runs.items()} == {n: trained["members"][n]["mlflow_run_id"] for n in MEMBERS}
    for name in ("add", "sub", "spell", "strict"):
        run = runs[name]
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"
        assert "error" not in run.data.tags
        # the single path's keys: per step, and the held-out reward before (step 0) and after (step 1)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "reward/mean")] == [1]
        assert {"actor/pg_loss", "actor/grad_norm", "reward/mean"} <= set(run.data.metrics)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/reward")] == [0, 1]
        assert run.data.metrics["val/reward"] == pytest.approx(trained["members"][name]["val_reward_after"])
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
        assert "adapter/adapter_config.json" in artifacts
    # parameters: the keys where a member differs from the shared config (its data; sub's rank, not add's)
    assert "data.train_files" in runs["add"].data.params
    assert "actor_rollout_ref.model.lora_rank" not in runs["add"].data.params
    assert runs["sub"].data.params["actor_rollout_ref.model.lora_rank"] == "4"
    # the gate's decision and reference on each member's run
    assert runs["add"].data.tags["published_ref"] == "add@1"
    assert runs["strict"].data.tags["published_ref"] == "-"
    assert runs["strict"].data.tags["decision"].startswith("skip: adapter does not beat its start")
    broken = runs["broken"]
    assert broken.info.status == "FAILED" and broken.data.tags["status"] == "failed"
    assert broken.data.tags["error"].startswith("RewardError at step 1: ")
    assert "deliberately broken reward" in broken.data.tags["error"]
    assert "reward/mean" not in broken.data.metrics


def test_the_report_has_every_member_on_one_figure_and_a_section_each(fleet_pipeline_run):
    run_dir = fleet_pipeline_run["run_dir"]
    figure = run_dir / "fleet_rewards.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (run_dir / "report.md").read_text()
    assert "![fleet_rewards.png](fleet_rewards.png)" in report
    assert "## Fleet members (5, 1 steps)" in report and "| adapter |" not in report  # no single-run table
    sections = {part.split("\n", 1)[0]: part for part in report.split("\n### ")[1:]}
    assert sorted(sections) == sorted(MEMBERS)
    assert "- published: `add@1`" in sections["add"] and "status: **published**" in sections["add"]
    assert "status: **not_published**" in sections["strict"] and "- published: nothing" in sections["strict"]
    assert "- publish decision: skip: adapter does not beat its start" in sections["strict"]
    assert "- error: RewardError at step 1: " in sections["broken"]
    assert "held-out reward: before " in sections["add"]


def test_a_member_figure_draws_each_members_reward_and_validation(tmp_path):
    """The figure from plain facts (no training): a line per member with steps, validation squares."""
    import matplotlib.image

    from pipeline.fleet_report import FIGURE, plot_fleet_rewards

    fleet = {"members": {"a": {"status": "published", "start_reward": 0.1},
                         "b": {"status": "failed", "start_reward": 0.2}}}
    history = [{"step": 1, "members/a/reward/mean": 0.3}, {"step": 2, "members/a/reward/mean": 0.5},
               {"step": 2, "members/a/val/reward": 0.6}]
    assert plot_fleet_rewards(history, fleet, tmp_path) == FIGURE
    assert matplotlib.image.imread(tmp_path / FIGURE).shape[2] in (3, 4)
    assert plot_fleet_rewards([], {"members": {"a": {"status": "failed", "start_reward": None}}}, tmp_path / "x") is None
