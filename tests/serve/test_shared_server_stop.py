"""tests/serve/shared_server.py's `stop()` for a replicated server checks that none of ITS replicas outlives the
command, and ignores replica processes of other servers on the machine (another session's suite, another module).
Stand-ins, no engine: a `pipeline serve` that starts one replica-titled child, and a foreign replica-titled process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.serve.shared_server import SharedServer
from tests.serve.test_replicas import REPLICA_TITLE, replica_pids

# the stand-in command: one "replica" child; on Ctrl-C it says what `pipeline serve` says and exits 0, taking its
# replica down unless told to leave it behind
FAKE_SERVE = textwrap.dedent("""
    import signal, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", sys.argv[2]],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # not the output pipe
    def stop(*_):
        if sys.argv[1] == "tidy":
            child.kill()
            child.wait()
        print("stopping the server", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGINT, stop)
    print("serving", flush=True)
    while True:
        time.sleep(0.1)
""")


def _started(tmp_path, mode: str) -> SharedServer:
    server = SharedServer(tmp_path / "registry", tmp_path / "base", [], replicated=True)
    server.cli = subprocess.Popen([sys.executable, "-c", FAKE_SERVE, mode, REPLICA_TITLE], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert server.cli.stdout.readline().strip() == "serving"
    server.output, server.replica_exit_s = "", 2.0
    return server


def _child_replicas(server_pid: int) -> set[int]:
    return {pid for pid in replica_pids() if _parent(pid) == server_pid}


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _wait_for_child_replica(server) -> set[int]:
    import time

    deadline = time.monotonic() + 30
    while not _child_replicas(server.cli.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    found = _child_replicas(server.cli.pid)
    assert found, "the stand-in's replica did not start"
    return found


def test_stop_ignores_other_servers_replicas_and_catches_its_own(tmp_path):
    foreign = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", REPLICA_TITLE])
    left_behind: set[int] = set()
    try:
        tidy = _started(tmp_path, "tidy")
        _wait_for_child_replica(tidy)
        tidy.stop()  # its replica went: passes, while another server's replica runs on
        assert foreign.pid in replica_pids()

        messy = _started(tmp_path, "messy")
        left_behind = _wait_for_child_replica(messy)
        with pytest.raises(AssertionError, match="outlived it"):
            messy.stop()
    finally:
        for pid in (foreign.pid, *left_behind):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        foreign.wait()
