"""`pipeline data from-serving` on capture folders written per the record spec: which records a reference
selects, the window and score filters, dedupe by prompt (the newest kept), the four formats, the empty-set
refusal naming its filter, never overwriting, and the manifest a training run carries into lineage."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest

from config import Config
from ground.capture_dataset import capture_lineage
from pipeline.cli import cli_entry
from registry import open_registry
from stages.train.data import load_rows
from stages.train.rewards import RewardFunction
from stages.train.rewards.feedback import feedback_match
from tests.capture_folders import feedback_record, iso, request_record, write_shard, T0
from tests.synthetic_lora import write_lora


@pytest.fixture
def capture(tmp_path):
    """arith@1 and arith@2 and another adapter; one prompt asked three times (v1, v1, v2), with feedback."""
    folder = tmp_path / "capture"
    r = {
        "old": request_record("What is 2 + 2?", "5", version=1, seconds=1),
        "mid": request_record("What is 2 + 2?", "4", version=1, seconds=2),
        "new": request_record("What is 2 + 2?", " 4 ", version=2, seconds=3),
        "other_q": request_record("What is 3 + 3?", "6", version=2, seconds=4),
        "late": request_record("What is 9 - 1?", "8", version=2, seconds=3600),
        "other_adapter": request_record("Hi", "Hello", adapter="chat", version=1, seconds=5),
        "completion": request_record("1 + 1 =", "2", version=1, seconds=6, endpoint="completion"),
    }
    write_shard(folder, "records", [r["old"], r["mid"], r["new"]], name="host-1-1-00000")
    write_shard(folder, "records", [r["other_q"], r["late"], r["other_adapter"], r["completion"]], name="host-2-1-00000")
    write_shard(folder, "feedback", [
        feedback_record(r["old"]["request_id"], label="bad"),
        feedback_record(r["mid"]["request_id"], score=0.2, seconds=100),
        feedback_record(r["mid"]["request_id"], score=0.9, seconds=101),  # repeated: the last wins
        feedback_record(r["other_q"]["request_id"], label="good"),
    ])
    return folder, r


def run(*args) -> int:
    return cli_entry(["data", "from-serving", *map(str, args)])


def test_verl_rows_train_reads_them_and_the_feedback_reward_scores_them(capture, tmp_path, capsys):
    folder, r = capture
    assert run("arith", "--capture", folder, "--out", tmp_path / "out") == 0
    printed = capsys.readouterr().out
    rows = load_rows(tmp_path / "out" / "train.parquet")  # the training stage's own reader
    by_id = {row["extra_info"]["request_id"]: row for row in rows}
    # 6 arith records, the 2 + 2 prompt asked 3 times: the newest (v2) is kept
    assert set(by_id) == {r["new"]["request_id"], r["other_q"]["request_id"], r["late"]["request_id"],
                          r["completion"]["request_id"]}
    row = by_id[r["new"]["request_id"]]
    assert row["prompt"] == [{"role": "user", "content": "What is 2 + 2?"}] and row["data_source"] == "feedback_match"
    assert row["extra_info"]["version"] == 2 and row["extra_info"]["feedback_score"] is None
    assert by_id[r["completion"]["request_id"]]["prompt"] == [{"role": "user", "content": "1 + 1 ="}]
    truth = json.loads(row["reward_model"]["ground_truth"])
    assert sorted((a["completion"], a["score"]) for a in truth["answers"]) == [("4", 0.9), ("5", 0.0)]
    # the reward: the matching answer's feedback (normalised text), an unmatched response 0
    reward = RewardFunction(Config())
    scores = reward(["feedback_match"] * 3, ["  4\n", "5", "four"], [row["reward_model"]["ground_truth"]] * 3)
    assert [s["score"] for s in scores] == [0.9, 0.0, 0.0]

    manifest_text = (tmp_path / "out" / "capture_dataset.json").read_text()
    manifest = json.loads(manifest_text)
    assert manifest["counts"] == {"read": 7, "torn_lines": 0, "other_adapters": 1, "outside_window": 0,
                                  "deduplicated": 2, "kept": 4, "kept_with_feedback": 1, "feedback_records": 4}
    assert manifest["adapter"] == {"reference": "arith", "name": "arith", "versions": "all"}
    digest = "sha256:" + hashlib.sha256(manifest_text.encode()).hexdigest()
    assert f"manifest {tmp_path / 'out' / 'capture_dataset.json'} {digest}" in printed
    assert manifest["files"]["train.parquet"] == \
        "sha256:" + hashlib.sha256((tmp_path / "out" / "train.parquet").read_bytes()).hexdigest()
    lineage = capture_lineage([str(tmp_path / "out" / "train.parquet")])
    assert lineage[0]["manifest_digest"] == digest and lineage[0]["data_file_matches"]
    assert lineage[0]["counts"]["kept"] == 4


def test_version_window_and_min_score(capture, tmp_path):
    folder, r = capture
    assert run("arith@1", "--capture", folder, "--out", tmp_path / "v1") == 0
    ids = {x["extra_info"]["request_id"] for x in load_rows(tmp_path / "v1" / "train.parquet")}
    assert ids == {r["mid"]["request_id"], r["completion"]["request_id"]}  # mid is newer than old
    # a window that ends before the late record; min-score keeps answers scored >= 0.5 (mid 0.9, other_q good)
    assert run("arith", "--capture", folder, "--out", tmp_path / "w", "--since", iso(T0),
               "--until", "2026-12-03T17:30:00Z", "--min-score", 0.5) == 0
    rows = load_rows(tmp_path / "w" / "train.parquet")
    assert {x["extra_info"]["request_id"] for x in rows} == {r["mid"]["request_id"], r["other_q"]["request_id"]}
    counts = json.loads((tmp_path / "w" / "capture_dataset.json").read_text())["counts"]
    assert (counts["outside_window"], counts["below_min_score"], counts["deduplicated"]) == (1, 3, 0)


def test_an_alias_resolves_through_the_registry(capture, tmp_path, tiny_model_dir):
    folder, r = capture
    store = tmp_path / "registry"
    reg = open_registry(store.as_uri(), mirror_mlflow=False)
    for seed in (1, 2):
        reg.publish(write_lora(tmp_path / f"l{seed}", rank=4, alpha=8.0, seed=seed), "arith", base_dir=tiny_model_dir)
    reg.set_alias("arith", "prod", 1)
    assert run("arith@prod", "--capture", folder, "--out", tmp_path / "p", "--registry", store) == 0
    manifest = json.loads((tmp_path / "p" / "capture_dataset.json").read_text())
    assert manifest["adapter"]["versions"] == [1] and manifest["adapter"]["resolved"] == "arith@1"
    assert manifest["counts"]["kept"] == 2


def test_trl_formats_and_messages(capture, tmp_path):
    folder, r = capture
    assert run("arith", "--capture", folder, "--out", tmp_path / "pc", "--format", "trl-prompt-completion") == 0
    pc = pd.read_parquet(tmp_path / "pc" / "train.parquet")
    assert list(pc.columns) == ["prompt", "completion"] and len(pc) == 4
    assert sorted(c[0]["content"] for c in pc["completion"]) == [" 4 ", "2", "6", "8"]
    assert run("arith", "--capture", folder, "--out", tmp_path / "up", "--format", "trl-unpaired-preference") == 0
    up = pd.read_parquet(tmp_path / "up" / "train.parquet")
    # only records with feedback, deduplicated by prompt (newest with feedback: mid 0.9 -> true), other_q good
    assert list(up.columns) == ["prompt", "completion"] + ["label"] and sorted(up["label"]) == [True, True]
    assert sorted(c[0]["content"] for c in up["completion"]) == ["4", "6"]
    assert run("arith", "--capture", folder, "--out", tmp_path / "bad", "--format", "trl-unpaired-preference",
               "--until", "2026-12-03T17:00:01.500Z") == 0
    assert list(pd.read_parquet(tmp_path / "bad" / "train.parquet")["label"]) == [False]  # old: labelled bad
    assert run("arith", "--capture", folder, "--out", tmp_path / "m", "--format", "messages") == 0
    m = pd.read_parquet(tmp_path / "m" / "train.parquet")
    conversations = sorted([[(t["role"], t["content"]) for t in row] for row in m["messages"]])
    assert [("user", "What is 2 + 2?"), ("assistant", " 4 ")] in conversations


def test_an_empty_result_is_refused_naming_the_filter(capture, tmp_path, capsys):
    folder, _ = capture
    assert run("nobody", "--capture", folder, "--out", tmp_path / "a") == 2
    assert "none of its 7 records is of `nobody`" in capsys.readouterr().err
    assert run("arith", "--capture", folder, "--out", tmp_path / "b", "--since", "2027-01-01T00:00:00Z") == 2
    assert "falls in the window --since 2027-01-01T00:00:00Z" in capsys.readouterr().err
    assert run("arith", "--capture", folder, "--out", tmp_path / "c", "--min-score", 2) == 2
    err = capsys.readouterr().err
    assert "at least --min-score 2.0" in err and "below_min_score 6" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_a_data_source_no_scorer_takes_is_refused_unless_a_custom_reward_scores_it(capture, tmp_path, capsys):
    """A misspelt --data-source would write a set that fails only at training's first reward."""
    folder, _ = capture
    assert run("arith", "--capture", folder, "--out", tmp_path / "a", "--data-source", "feedback_mach") == 2
    err = capsys.readouterr().err
    assert "--data-source 'feedback_mach'" in err and "Did you mean --data-source feedback_match?" in err
    assert "arithmetic" in err and "--custom-reward" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()
    assert run("arith", "--capture", folder, "--out", tmp_path / "b", "--data-source", "my_judge",
               "--custom-reward") == 0
    assert {row["data_source"] for row in load_rows(tmp_path / "b" / "train.parquet")} == {"my_judge"}
    # the other formats carry no data_source
    assert run("arith", "--capture", folder, "--out", tmp_path / "c", "--format", "messages", "--data-source", "x") == 0


def test_never_overwrites(capture, tmp_path, capsys):
    folder, _ = capture
    out = tmp_path / "out"
    out.mkdir()
    (out / "capture_dataset.json").write_text("mine")
    assert run("arith", "--capture", folder, "--out", out) == 2
    assert "capture_dataset.json` already exist(s)" in capsys.readouterr().err
    assert (out / "capture_dataset.json").read_text() == "mine" and not (out / "train.parquet").exists()


def test_a_torn_line_is_counted_in_the_manifest(capture, tmp_path):
    folder, _ = capture
    write_shard(folder, "records", [request_record("What is 7 + 1?", "8", seconds=7)], name="host-3-1-00000",
                tail=b'{"kind": "request", "form')
    assert run("arith", "--capture", folder, "--out", tmp_path / "t") == 0
    manifest = json.loads((tmp_path / "t" / "capture_dataset.json").read_text())
    assert manifest["counts"]["torn_lines"] == 1 and manifest["torn_lines"] == ["records/host-3-1-00000.jsonl:2"]
    assert manifest["counts"]["kept"] == 5


def test_feedback_match_refuses_a_ground_truth_it_did_not_write():
    with pytest.raises(ValueError, match="not a from-serving answer list"):
        feedback_match("4", "4", {})


def test_publish_records_the_capture_manifest_in_lineage(capture, tmp_path, tiny_model_dir, capsys):
    from config import load_config
    from ground.model_files import fingerprint
    from stages.publish import publish

    folder, _ = capture
    assert run("arith", "--capture", folder, "--out", tmp_path / "set") == 0
    digest = capsys.readouterr().out.split()[-1]
    store = tmp_path / "store"
    cfg = load_config(None, [f"registry.uri={store}", "publish.name=arith",
                             f"data.train_files={tmp_path / 'set' / 'train.parquet'}"])
    staged = {"source_dir": str(tiny_model_dir), "fingerprint": fingerprint(tiny_model_dir)}
    out = publish(cfg, "run-1", staged, {"adapter_dir": str(write_lora(tmp_path / "a", seed=1)), "steps": 2},
                  {"publish": True, "decision": "publish: test"})
    lineage = open_registry(str(store), mirror_mlflow=False).get_version("arith", out["version"]).lineage
    [captured] = lineage["capture_datasets"]
    assert captured["manifest"] == str((tmp_path / "set" / "capture_dataset.json").resolve())
    assert captured["manifest_digest"] == digest and captured["data_file_matches"] is True
    assert captured["counts"]["kept"] == 4 and captured["window"]["until"] is None
    assert captured["capture"] == str(folder.resolve())


def test_the_docs_recipe_rescores_captured_prompts_with_a_rule_scorer(tmp_path, monkeypatch):
    """docs/flywheel.md's block that gives captured arithmetic questions the `arithmetic` scorer, run as written."""
    import re
    from pathlib import Path

    folder = tmp_path / "cap"
    write_shard(folder, "records", [request_record("What is 3 + 4? Answer with just the number.", "9", seconds=1),
                                    request_record("Hello", "hi", seconds=2),
                                    request_record("What is 9 - 12? Answer with just the number.", "?", seconds=3)])
    monkeypatch.chdir(tmp_path)  # the docs' relative paths; the next tests keep their own working folder
    assert run("arith", "--capture", folder, "--out", "data/from-arith") == 0
    docs = (Path(__file__).resolve().parents[2] / "docs" / "flywheel.md").read_text()
    [block] = [b for b in re.findall(r"```python\n(.*?)```", docs, re.S) if "from-arith-rule" in b]
    exec(compile(block, "docs/flywheel.md", "exec"), {})
    rows = load_rows("data/from-arith-rule/train.parquet")
    assert [(r["data_source"], r["reward_model"]["ground_truth"]) for r in rows] == [("arithmetic", "7"),
                                                                                     ("arithmetic", "-3")]
    scores = RewardFunction(Config())(["arithmetic"] * 2, ["7", "3"], ["7", "-3"])
    assert [s["score"] for s in scores] == [1.0, 0.0]
