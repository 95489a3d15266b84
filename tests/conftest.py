"""Shared fixtures: a tiny model built once per session, isolated caches and stores per test."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.tiny_model import build_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A suite started as a background job (`cmd &` in a script, nohup) inherits SIGINT ignored, and so would every
# command it starts: Python keeps an ignored SIGINT, and the tests that stop `pipeline serve` or a pipeline run
# with Ctrl-C (SIGINT) would then wait for a process that never hears it. Children get the default back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_configure(config):
    """Watch /dev/shm for the whole session (tests/shm_guard.py): every process started from here on carries
    the session's mark, so the segments it maps can be told from other programs' at the end."""
    from tests.shm_guard import ShmGuard

    if not hasattr(config, "workerinput"):  # the controlling process only
        config._shm_guard = ShmGuard().start()


def pytest_sessionfinish(session, exitstatus):
    """Fail the session if psm_* segments that the suite's own processes mapped are still in /dev/shm and no
    live process maps them (left behind by something the suite started)."""
    guard = getattr(session.config, "_shm_guard", None)
    if guard is None:
        return
    session.config._shm_guard = None
    leaked, unattributed = guard.finish()
    session.config._shm_report = (leaked, unattributed)
    if leaked and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    leaked, unattributed = getattr(config, "_shm_report", ([], []))
    if leaked:
        terminalreporter.section("/dev/shm leaked by this test session", red=True, bold=True)
        terminalreporter.line(f"{len(leaked)} psm_* segment(s) that processes of this session mapped are still in "
                              "/dev/shm and mapped by no live process (RAM until reboot):", red=True)
        for line in leaked:
            terminalreporter.line(f"  {line}", red=True)
    if unattributed:
        terminalreporter.section("/dev/shm: new unmapped segments of unknown owner", yellow=True)
        terminalreporter.line(f"{len(unattributed)} psm_* segment(s) appeared during the session and are mapped by "
                              "nobody, but no process of this session was seen mapping them (another run's?):")
        for line in unattributed:
            terminalreporter.line(f"  {line}")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_stores(tmp_path_factory):
    """MLflow and the registry default to folders under the current directory; tests never write into the
    checkout."""
    root = tmp_path_factory.mktemp("stores")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["PIPELINE_REGISTRY"] = str(root / "registry")
    os.environ["PIPELINE_REGISTRY_CACHE"] = str(root / "registry-cache")
    yield root


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """Relative defaults (./runs, ./checkpoints) land in the test's own temp dir."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama model folder (float32 safetensors + tokenizer + chat template). Read-only for tests."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-llama")


@pytest.fixture
def tiny_model_copy(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model that a test may modify."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real MLflow tracking server for the session (tests/mlflow_server.py): sqlite backend, artifacts through
    its proxy, a free port. Tests that use it empty it first (`tests.mlflow_server.wipe`)."""
    from tests.mlflow_server import MlflowServerProcess

    server = MlflowServerProcess(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()
