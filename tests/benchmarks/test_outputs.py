"""The benchmarks refuse, before measuring anything, to write over an existing --out without --force."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("script, out_flag, out_name", [
    ("rollout_sync.py", "--out", "result.json"),
    ("serve_multi_lora.py", "--out", "result.json"),
    ("train_step.py", "-o", "result.md"),
    ("vs_trl.py", "-o", "result.md"),
    ("generate_floor.py", "-o", "result.json"),
    ("update_profile.py", "-o", "result.json"),
    ("fleet.py", "--out", "result.json"),
    ("fleet_rollout.py", "--out", "result.json"),
])
def test_existing_result_is_kept_without_force(tmp_path, script, out_flag, out_name):
    out = tmp_path / out_name
    out.write_text("an earlier measurement\n")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), out_flag, str(out)], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and "already exist" in proc.stderr and "--force" in proc.stderr
    assert out.read_text() == "an earlier measurement\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out_name]


@pytest.mark.parametrize("script, args, named", [
    ("generate_floor.py", ["--calls", "0"], "--calls 0"),
    ("generate_floor.py", ["--variants", "fast"], "unknown ['fast']"),
    ("update_profile.py", ["--updates", "0"], "--updates 0"),
])
def test_bad_arguments_are_refused_by_name_before_measuring(tmp_path, script, args, named):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and named in proc.stderr
