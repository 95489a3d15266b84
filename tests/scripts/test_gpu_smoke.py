"""scripts/gpu_smoke.sh: a clear message and exit 0 without CUDA; the same update path runs on CPU (--cpu);
on a CUDA machine (marker gpu) the real smoke run: FSDP2 over NCCL in bf16."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, hide_gpus: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    if hide_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_smoke.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_without_cuda_it_says_so_and_exits_cleanly():
    done = _run(hide_gpus=True)
    assert done.returncode == 0, done.stderr
    assert "CUDA is not available" in done.stdout and "Traceback" not in done.stderr


def test_cpu_run_of_the_same_path_prints_step_time_and_loss():
    done = _run("--cpu", "--shape", "tiny", "--steps", "2", "--rows", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "backend=gloo" in done.stdout and "step 2:" in done.stdout and "pg_loss=" in done.stdout
    assert "gpu_smoke: OK median step" in done.stdout


@pytest.mark.slow
def test_cpu_run_of_the_fleet_path_prints_step_time_per_member_count():
    # --members alone means 1,4,16 (what a GPU run prints); on CPU two small counts keep the check short
    done = _run("--cpu", "--shape", "tiny", "--members", "1,3", "--steps", "2", "--rows-per-member", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fleet members=3 step 2:" in done.stdout and "members_stepped=3" in done.stdout
    assert "gpu_smoke: OK fleet median step at 1 rows per member, backend=gloo: N=1: " in done.stdout
    assert ", N=3: " in done.stdout and "x N separate" in done.stdout and "Traceback" not in done.stderr


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_smoke_run():
    done = _run("--steps", "3", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "backend=nccl" in done.stdout and "dtype=bfloat16" in done.stdout and "gpu_smoke: OK" in done.stdout


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_fleet_smoke_run():
    done = _run("--members", "--steps", "3", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "backend=nccl" in done.stdout and "N=1: " in done.stdout and "N=16: " in done.stdout
