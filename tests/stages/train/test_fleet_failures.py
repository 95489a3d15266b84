"""Fleet member failures that stop before any engine starts (fast): --fail-fast at a member's bad data stops the
fleet with exit 2 and records who failed and who was stopped; a fleet whose members all fail writes its outcome
without starting Ray."""

from __future__ import annotations

import json

import yaml
from click.testing import CliRunner

from tests.stages.train.fleet_helpers import write_fleet


def _members_without_train_files(tmp_path, tiny_model_dir, names):
    path = write_fleet(tiny_model_dir, tmp_path, steps=1)
    doc = yaml.safe_load(path.read_text())
    for member in doc["fleet"]["members"]:
        if member["name"] in names:
            member["data"]["train_files"] = str(tmp_path / f"{member['name']}-missing.parquet")
    path.write_text(yaml.safe_dump(doc))
    return path


def _cli(*args):
    from pipeline.cli import main

    return CliRunner().invoke(main, list(args))


def test_fail_fast_stops_the_fleet_at_the_first_member_failure(tmp_path, tiny_model_dir):
    from ground.errors import StageError

    path = _members_without_train_files(tmp_path, tiny_model_dir, {"sub"})
    out = tmp_path / "out"
    result = _cli("train", "--fleet", str(path), "--out-dir", str(out), "--fail-fast")
    assert isinstance(result.exception, StageError), result.output
    assert "fleet member sub failed (DataError" in str(result.exception) and "--fail-fast" in str(result.exception)
    outcome = json.loads((out / "fleet_outcome.json").read_text())
    assert outcome["stopped_by_fail_fast"] is True
    statuses = {n: m["status"] for n, m in outcome["members"].items()}
    assert statuses["sub"] == "failed" and statuses["add"] == "stopped"
    assert outcome["members"]["sub"]["error"]["type"] == "DataError"


def test_a_fleet_whose_members_all_fail_writes_its_outcome(tmp_path, tiny_model_dir):
    names = {"add", "sub", "spell", "nodata", "broken"}
    path = _members_without_train_files(tmp_path, tiny_model_dir, names)
    out = tmp_path / "out"
    result = _cli("train", "--fleet", str(path), "--out-dir", str(out))
    assert result.exit_code == 0, result.output
    outcome = json.loads((out / "fleet_outcome.json").read_text())
    assert {m["status"] for m in outcome["members"].values()} == {"failed"}
    assert outcome["steps"] == 0
    assert result.output.count("add-missing.parquet") == 1  # each failure said once


def test_fleet_flags_need_a_fleet_file(tmp_path):
    from ground.errors import ConfigError

    result = _cli("train", "--resume")
    assert isinstance(result.exception, ConfigError) and "--fleet" in str(result.exception)
    result = _cli("train", "--fleet", str(tmp_path / "fleet.yaml"), "--resume", "--force")
    assert isinstance(result.exception, ConfigError) and "contradict" in str(result.exception)
