"""serve.replicas.leftovers with real processes (no Ray, no vLLM): what a dead replica leaves goes, what a stopping
replica's engine left goes before its record, and a record outlives any segment it names."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from serve.replicas.leftovers import sweep
from serve.shm_owners import start_ticks


def _record(owners_dir, owner_pid: int, engine: list[int], segment: str, run_dir) -> None:
    data = {"owner": [owner_pid, start_ticks(owner_pid)], "engine": [[pid, start_ticks(pid)] for pid in engine],
            "segments": [segment], "run_dir": str(run_dir)}
    (owners_dir / f"{owner_pid}.json").write_text(json.dumps(data))


def test_sweep_stops_a_dead_replicas_engine_and_removes_its_files_but_leaves_a_live_one(tmp_path):
    owners = tmp_path / "owners"
    owners.mkdir()
    dead_seg, live_seg = (f"/dev/shm/psm_lorapipelinetest{secrets.token_hex(4)}" for _ in range(2))
    dead_run, live_run = tmp_path / "pipeline-serve-run-dead", tmp_path / "pipeline-serve-run-live"
    procs = []
    try:
        for path in (dead_seg, live_seg, dead_run, live_run):
            os.mkdir(path) if "run" in os.path.basename(path) else open(path, "wb").close()
        dead_owner = subprocess.Popen([sys.executable, "-c", "pass"])  # a replica that is gone
        engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # its orphaned engine core
        live_owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        procs = [engine, live_owner]
        _record(owners, dead_owner.pid, [engine.pid], dead_seg, dead_run)  # recorded while it lived
        dead_owner.wait()
        _record(owners, live_owner.pid, [], live_seg, live_run)
        (owners / "garbage.json").write_text("{not json")

        started = time.monotonic()
        removed = sweep(owners_dir=owners, grace_s=5.0)

        assert removed == [dead_seg]
        assert engine.wait(timeout=5) == -9, "the dead replica's engine core was not stopped"
        assert not os.path.exists(dead_seg) and not dead_run.exists()
        assert not (owners / f"{dead_owner.pid}.json").exists()
        assert os.path.exists(live_seg) and live_run.exists() and (owners / f"{live_owner.pid}.json").exists()
        assert (owners / "garbage.json").exists()  # unreadable: not ours to judge
        assert time.monotonic() - started < 5.0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for seg in (dead_seg, live_seg):
            if os.path.exists(seg):
                os.unlink(seg)


# A replica stand-in: it starts an "engine core" child that maps a /dev/shm/psm_* segment and ignores SIGTERM
# (like a busy engine core that vLLM's shutdown gives up on), records both, and on a line from stdin releases.
REPLICA = """
import json, subprocess, sys
from pathlib import Path
from serve.replicas.leftovers import OwnerRecord
segment, owners, run_dir = sys.argv[1:4]
engine = subprocess.Popen([sys.executable, "-c", '''
import mmap, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(sys.argv[1], "w+b") as f:
    f.truncate(4096)
    mapping = mmap.mmap(f.fileno(), 4096)
print("ready", flush=True)
time.sleep(120)
''', segment], stdout=subprocess.PIPE, text=True)
assert engine.stdout.readline().strip() == "ready"
record = OwnerRecord(run_dir, owners_dir=Path(owners), app="test-app")
print(json.dumps({"engine": engine.pid, "record": json.loads(record.path.read_text())}), flush=True)
sys.stdin.readline()
gone = record.release(grace_s=5.0)
print(json.dumps({"gone": gone, "engine_rc": engine.wait(timeout=5)}), flush=True)
"""


def _repo_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def test_release_stops_the_engine_and_removes_its_segments_before_its_record(tmp_path):
    """What a replica does when Serve stops it, after engine.shutdown(): an engine process left running is
    killed, its segment and the run folder go, and the record goes last."""
    owners = tmp_path / "owners"
    segment = f"/dev/shm/psm_lorapipelinetest{secrets.token_hex(4)}"
    run_dir = tmp_path / "pipeline-serve-run-x"
    run_dir.mkdir()
    replica = subprocess.Popen([sys.executable, "-c", REPLICA, segment, str(owners), str(run_dir)], env=_repo_env(),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        started = json.loads(replica.stdout.readline())
        record = started["record"]
        assert record["app"] == "test-app" and record["owner"][0] == replica.pid
        assert segment in record["segments"] and started["engine"] in [pid for pid, _ in record["engine"]]
        assert (owners / f"{replica.pid}.json").exists()

        replica.stdin.write("release\n")
        replica.stdin.flush()
        released = json.loads(replica.stdout.readline())

        assert released == {"gone": [segment], "engine_rc": -9}
        assert not os.path.exists(segment) and not run_dir.exists()
        assert not (owners / f"{replica.pid}.json").exists()
    finally:
        replica.kill()
        replica.wait()
        if os.path.exists(segment):
            os.unlink(segment)


def test_a_record_stays_while_one_of_its_segments_cannot_be_removed(tmp_path):
    """The record is what lets a later start find the segments: it is deleted only once they are gone."""
    from serve.shm_owners import clear_record

    removable = f"/dev/shm/psm_lorapipelinetest{secrets.token_hex(4)}"
    stuck = f"/dev/shm/psm_lorapipelinetest{secrets.token_hex(4)}"  # a folder: unlink() fails on it
    path = tmp_path / "1.json"
    data = {"owner": [1, None], "engine": [], "segments": [removable, stuck], "run_dir": None}
    path.write_text(json.dumps(data))
    open(removable, "wb").close()
    os.mkdir(stuck)
    try:
        assert clear_record(path, data) == [removable]
        assert not os.path.exists(removable) and path.exists()
        os.rmdir(stuck)
        assert clear_record(path, data) == [] and not path.exists()
    finally:
        for seg in (removable, stuck):
            if os.path.isdir(seg):
                os.rmdir(seg)
            elif os.path.exists(seg):
                os.unlink(seg)


def test_wait_for_owners_waits_only_for_this_runs_live_replicas(tmp_path):
    from serve.replicas.leftovers import wait_for_owners

    owners = tmp_path / "owners"
    owners.mkdir()
    ours, other = (subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2))
    try:
        for proc, app in ((ours, "run-a"), (other, "run-b")):
            (owners / f"{proc.pid}.json").write_text(json.dumps(
                {"owner": [proc.pid, start_ticks(proc.pid)], "engine": [], "segments": [], "run_dir": None,
                 "app": app}))
        assert wait_for_owners("run-a", 0.3, owners_dir=owners) == [ours.pid]
        ours.kill()
        ours.wait()
        started = time.monotonic()
        assert wait_for_owners("run-a", 10, owners_dir=owners) == []  # the other run's live replica is not waited for
        assert time.monotonic() - started < 5
    finally:
        for proc in (ours, other):
            proc.kill()
            proc.wait()
