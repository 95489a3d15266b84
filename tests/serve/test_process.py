"""serve.server's process handling with real processes (no vLLM): session-wide stop and shm cleanup."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time

import pytest

from ground.errors import StageError
from serve.server import ServerHandle, round_lora_rank, session_pids

# A stand-in for an engine tree: the leader forks a child; both map a /dev/shm/psm_* segment, like vLLM's
# message queues, and the child ignores SIGTERM, like a wedged engine core.
FAKE_ENGINE = """
import mmap, os, signal, sys, time
path = sys.argv[1]
with open(path, "w+b") as f:
    f.truncate(4096)
    mapping = mmap.mmap(f.fileno(), 4096)
if os.fork() == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    print("ready", flush=True)
time.sleep(120)
"""


def _start_fake(segment: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", FAKE_ENGINE, segment], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 10
    while len(session_pids(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("hard_kill_first", [False, True])
def test_stop_ends_the_whole_session_and_removes_its_shm(tmp_path, hard_kill_first):
    segment = f"/dev/shm/psm_lorapipelinetest{secrets.token_hex(4)}"
    proc = None
    try:
        proc = _start_fake(segment)
        handle = ServerHandle(url="http://127.0.0.1:9/v1", base_name="fake", process=proc, log_path=tmp_path / "log")
        handle._remember_shm()  # what the readiness wait does while the server starts
        assert segment in handle.shm_segments and len(session_pids(handle.pid)) == 2
        if hard_kill_first:  # a timeout or the OOM killer: nobody unlinks the segment
            for pid in session_pids(handle.pid):
                os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        handle.stop(timeout=2)
        assert session_pids(handle.pid) == []  # the SIGTERM-ignoring child was killed too
        assert not os.path.exists(segment)
        assert time.monotonic() - t0 < 20
        handle.stop()  # idempotent
    finally:
        for pid in session_pids(proc.pid) if proc else []:
            os.kill(pid, signal.SIGKILL)
        if os.path.exists(segment):
            os.unlink(segment)


def test_lora_rank_rounds_up_to_what_vllm_accepts():
    assert [round_lora_rank(r) for r in (0, 1, 4, 8, 9, 16, 33, 300, 512)] == [1, 1, 8, 8, 16, 16, 64, 320, 512]
    with pytest.raises(StageError, match="at most rank 512"):
        round_lora_rank(1024)


def test_next_start_removes_segments_of_a_recorded_server_that_was_sigkilled(tmp_path):
    """The owner record that start_server writes, then a SIGKILL of the whole tree (nobody cleans up), then what
    the next start runs: the dead server's segment and run folder go; a live recorded server's stay."""
    from serve import shm_owners
    from serve.server import shm_segments_of

    dead_seg, live_seg = (f"/dev/shm/psm_lorapipelinetest{secrets.token_hex(4)}" for _ in range(2))
    run_dir = tmp_path / "pipeline-serve-run-x"
    run_dir.mkdir()
    dead = live = None
    try:
        dead, live = _start_fake(dead_seg), _start_fake(live_seg)
        for proc, seg in ((dead, dead_seg), (live, live_seg)):
            assert shm_segments_of(session_pids(proc.pid)) == {seg}
            shm_owners.record(proc.pid, {seg}, str(run_dir) if proc is dead else None)
        for pid in session_pids(dead.pid):
            os.kill(pid, signal.SIGKILL)
        dead.wait()
        deadline = time.monotonic() + 10
        while session_pids(dead.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.exists(dead_seg)  # what a SIGKILL leaves behind
        removed = shm_owners.remove_orphans(session_pids)
        assert dead_seg in removed and not os.path.exists(dead_seg) and not run_dir.exists()
        assert os.path.exists(live_seg) and (shm_owners.OWNERS_DIR / f"{live.pid}.json").exists()
        assert not (shm_owners.OWNERS_DIR / f"{dead.pid}.json").exists()
    finally:
        for proc in (dead, live):
            for pid in session_pids(proc.pid) if proc else []:
                os.kill(pid, signal.SIGKILL)
            if proc:
                shm_owners.forget(proc.pid)
        for seg in (dead_seg, live_seg):
            if os.path.exists(seg):
                os.unlink(seg)
