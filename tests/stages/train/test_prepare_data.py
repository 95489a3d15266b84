"""Data files: a user's file is never generated into or overwritten; the demo still makes its own data.

The issue-16 reproduction runs the real `pipeline` command in a folder holding the user's 8-row good.parquet.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from config import load_config
from ground.errors import ConfigError, DataError
from stages.train.prepare_data import ensure_data
from stages.train.arithmetic import question_row
from stages.train.data import load_rows

REPO = Path(__file__).resolve().parents[3]
# The real CLI in a fresh process; it also reports whether anything heavy was imported before it exited.
CLI = ("import sys; from pipeline.cli import cli_entry; rc = cli_entry(sys.argv[1:]); "
       "print('heavy imports:', sorted(m for m in ('ray', 'vllm') if m in sys.modules)); sys.exit(rc)")


def _write_good(path: Path) -> str:
    """The user's own 8 rows (verl format); returns the file's sha256."""
    rows = [question_row(i, "+", 2, "mine", i) for i in range(8)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("command, train, val", [
    (["train"], "nonexist.parquet", "good.parquet"),
    (["run", "train-and-publish"], "nonexist.parquet", "good.parquet"),
    (["train"], "good.parquet", "nonexist.parquet"),
])
def test_mistyped_path_keeps_the_users_file_and_fails_fast(tmp_path, command, train, val):
    good = tmp_path / "good.parquet"
    digest = _write_good(good)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CLI, *command, f"data.train_files={train}",
                           f"data.val_files={val}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "`nonexist.parquet`" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _sha(good) == digest  # byte for byte the user's file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.parquet"]  # no data, no run directory
    assert "heavy imports: []" in proc.stdout  # failed before Ray or vLLM were even imported
    assert seconds < 60


def test_default_demo_generates_its_data_in_a_fresh_folder(tmp_path):
    cfg = load_config()  # the conftest runs every test in its own empty tmp cwd
    assert cfg.data.generate_if_missing == "arithmetic"
    assert ensure_data(cfg) == ["data/arithmetic/train.parquet", "data/arithmetic/test.parquet"]
    train, test = Path("data/arithmetic/train.parquet"), Path("data/arithmetic/test.parquet")
    assert len(load_rows(train)) == 1024 and len(load_rows(test)) == 64
    before = (train.stat().st_mtime_ns, _sha(train), _sha(test))
    assert ensure_data(load_config()) == []  # present: nothing written again
    assert (train.stat().st_mtime_ns, _sha(train), _sha(test)) == before
    assert sorted(os.listdir("data/arithmetic")) == ["test.parquet", "train.parquet"]  # no temporary files left


def test_a_file_in_the_demos_own_path_is_kept(tmp_path):
    user_test = Path("data/arithmetic/test.parquet")
    user_test.parent.mkdir(parents=True)
    digest = _write_good(user_test)
    with pytest.raises(DataError) as err:
        ensure_data(load_config())
    msg = str(err.value)
    assert "`data/arithmetic/test.parquet` (data.val_files" in msg and "exists while" in msg
    assert "`data/arithmetic/train.parquet` (data.train_files" in msg and "does not" in msg
    assert "create the missing file" in msg and "demo's folder" in msg and "data.generate_if_missing=null" in msg
    assert _sha(user_test) == digest and not Path("data/arithmetic/train.parquet").exists()


def test_generation_belongs_to_the_layer_that_names_the_paths(tmp_path):
    own = ["data.train_files=mine/a.parquet", "data.val_files=mine/b.parquet"]
    # embedded default + the user's paths: their files, never generated
    cfg = load_config(None, own)
    assert cfg.data.generate_if_missing is None
    assert cfg.source_of("data.train_files") == "the command line"
    assert "turned off" in cfg.source_of("data.generate_if_missing")
    # one path is enough to turn it off (the other stays the demo's)
    assert load_config(None, own[:1]).data.generate_if_missing is None
    # a -c file that asks for generation with its own paths keeps it; a later command-line path turns it off
    user_cfg = tmp_path / "mine.yaml"
    user_cfg.write_text("data:\n  train_files: d/train.parquet\n  val_files: d/test.parquet\n"
                        "  generate_if_missing: arithmetic\n")
    assert load_config(user_cfg).data.generate_if_missing == "arithmetic"
    assert load_config(user_cfg).source_of("data.train_files") == f"config file {user_cfg}"
    assert load_config(user_cfg, own[:1]).data.generate_if_missing is None
    # the user marks their own paths as generated on the command line
    marked = load_config(None, own + ["data.generate_if_missing=arithmetic"])
    assert marked.data.generate_if_missing == "arithmetic"
    assert marked.source_of("data.generate_if_missing") == "the command line"
    # the embedded default's own paths keep it
    assert load_config().source_of("data.train_files").startswith("the embedded default config")


def test_marked_paths_are_generated_only_when_all_are_missing(tmp_path):
    marked = ["data.train_files=mine/a.parquet", "data.val_files=mine/b.parquet", "data.generate_if_missing=arithmetic",
              "data.generate_kwargs={n_train: 16, n_test: 4}"]
    assert ensure_data(load_config(None, marked)) == ["mine/a.parquet", "mine/b.parquet"]
    a = Path("mine/a.parquet")
    a.unlink()
    b_digest = _sha(Path("mine/b.parquet"))
    with pytest.raises(DataError, match="nothing was written"):
        ensure_data(load_config(None, marked))
    assert not a.exists() and _sha(Path("mine/b.parquet")) == b_digest


def test_generate_kwargs_cannot_ask_to_overwrite(tmp_path):
    cfg = load_config(None, ["data.generate_kwargs={replace: true}"])
    with pytest.raises(ConfigError, match="data.generate_kwargs"):
        ensure_data(cfg)
    assert not Path("data").exists() or not any(Path("data").rglob("*.parquet"))
