"""serve.replicas.leftovers.sweep with real processes (no Ray, no vLLM): what a SIGKILLed replica leaves goes."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time

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
