"""`pipeline data make-arithmetic`, `pipeline algorithms`, and the GSM8K conversion example."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import cli_entry
from config import Config
from stages.train import core_algos as ca
from stages.train.data import load_rows
from stages.train.rewards import REWARD_SCORERS, RewardFunction

REPO = Path(__file__).resolve().parents[3]


def question_key(r):
    return r["prompt"][0]["content"]


def test_make_arithmetic_via_cli(tmp_path, capsys):
    out = tmp_path / "arith"
    code = cli_entry(["data", "make-arithmetic", "--out", str(out), "--train-size", "120", "--test-size", "30",
                      "--seed", "3"])
    assert code == 0
    assert "train.parquet" in capsys.readouterr().out
    train, test = load_rows(out / "train.parquet"), load_rows(out / "test.parquet")
    assert len(train) == 120 and len(test) == 30
    assert not {question_key(r) for r in train} & {question_key(r) for r in test}  # disjoint
    for r in train + test:
        extra = r["extra_info"]
        assert r["data_source"] == "arithmetic" and 0 <= extra["a"] <= 9 and 0 <= extra["b"] <= 9
        assert extra["op"] in "+-"
        expected = extra["a"] + extra["b"] if extra["op"] == "+" else extra["a"] - extra["b"]
        assert r["reward_model"]["ground_truth"] == str(expected)
        assert f"What is {extra['a']} {extra['op']} {extra['b']}?" in question_key(r)
    # the rows are scored by the arithmetic scorer: the truth itself scores 1
    scores = RewardFunction(Config())([r["data_source"] for r in test], [r["reward_model"]["ground_truth"] for r in test],
                     [r["reward_model"]["ground_truth"] for r in test], [r["extra_info"] for r in test])
    assert all(s["score"] == 1.0 for s in scores)
    # the same seed writes the same files
    again = tmp_path / "again"
    assert cli_entry(["data", "make-arithmetic", "--out", str(again), "--train-size", "120", "--test-size", "30",
                      "--seed", "3"]) == 0
    assert load_rows(again / "train.parquet") == train


def test_make_arithmetic_options_and_errors(tmp_path, capsys):
    out = tmp_path / "mul"
    assert cli_entry(["data", "make-arithmetic", "--out", str(out), "--low", "10", "--high", "20", "--ops", "*",
                      "--train-size", "5", "--test-size", "5"]) == 0
    rows = load_rows(out / "train.parquet")
    assert all(r["extra_info"]["op"] == "*" and 10 <= r["extra_info"]["a"] <= 20 for r in rows)
    assert cli_entry(["data", "make-arithmetic", "--out", str(out), "--ops", "/"]) == 2
    assert "valid operations are +, -, *" in capsys.readouterr().err
    assert cli_entry(["data", "make-arithmetic", "--out", str(out), "--low", "5", "--high", "1"]) == 2


def test_make_arithmetic_never_overwrites_without_force(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "test.parquet").write_bytes(b"the user's own file")
    args = ["data", "make-arithmetic", "--out", str(out), "--train-size", "8", "--test-size", "4"]
    assert cli_entry(args) == 2
    err = capsys.readouterr().err
    assert "test.parquet` already exists" in err and "--force" in err
    assert (out / "test.parquet").read_bytes() == b"the user's own file"
    assert sorted(p.name for p in out.iterdir()) == ["test.parquet"]  # train.parquet not written either
    assert cli_entry(args + ["--force"]) == 0
    assert len(load_rows(out / "test.parquet")) == 4 and len(load_rows(out / "train.parquet")) == 8
    assert sorted(p.name for p in out.iterdir()) == ["test.parquet", "train.parquet"]  # no temporary files left


def test_algorithms_lists_every_registry_entry(capsys):
    assert cli_entry(["algorithms"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = {line.split()[0] for line in lines if line.startswith("  ")}
    expected = (set(ca.ADV_ESTIMATORS) | set(ca.POLICY_LOSSES) | set(ca.LOSS_AGG_MODES) | set(REWARD_SCORERS)
                | set(ca.KL_ESTIMATORS))
    assert names == expected
    assert all(len(line.split(None, 1)) == 2 for line in lines if line.startswith("  "))  # each has a description


def test_gsm8k_example_converts_a_small_parquet(tmp_path):
    spec = importlib.util.spec_from_file_location("gsm8k_to_parquet", REPO / "examples" / "gsm8k_to_parquet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    src = tmp_path / "gsm8k-train.parquet"
    pq.write_table(pa.table({
        "question": ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
                     "May. How many clips did Natalia sell altogether in April and May?",
                     "A shop sells 1,000 pens a day. How many in 2 days?"],
        "answer": ["Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                   "altogether in April and May.\n#### 72",
                   "1,000 * 2 = 2,000\n#### 2,000"],
    }), src)
    out = tmp_path / "out"
    assert module.main(["--train", str(src), "--test", str(src), "--out", str(out)]) == 0
    rows = load_rows(out / "train.parquet")
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["72", "2000"]
    assert rows[0]["data_source"] == "openai/gsm8k" and "####" in rows[0]["prompt"][0]["content"]
    scorer = REWARD_SCORERS["gsm8k"].fn
    assert scorer("48 + 24 = 72\n#### 72", rows[0]["reward_model"]["ground_truth"], {})["score"] == 1.0
    # an existing output is never overwritten without --force
    written = (out / "train.parquet").read_bytes()
    (out / "test.parquet").write_bytes(b"kept")
    assert module.main(["--train", str(src), "--test", str(src), "--out", str(out)]) == 2
    assert (out / "test.parquet").read_bytes() == b"kept" and (out / "train.parquet").read_bytes() == written
    assert module.main(["--train", str(src), "--test", str(src), "--out", str(out), "--force"]) == 0
    assert len(load_rows(out / "test.parquet")) == 2
    assert module.main(["--train", str(tmp_path / "none.parquet"), "--test", str(src), "--out", str(tmp_path / "o2")]) == 2
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"question": ["q"], "answer": ["no marker"]}), bad)
    with pytest.raises(ValueError, match="train row 0"):
        module.convert_file(bad, tmp_path / "x.parquet", "train")
