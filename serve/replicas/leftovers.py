"""What a dead replica leaves on its node, and who removes it.

A replica is a Ray actor process that owns one vLLM engine; the engine's core runs in a child process and maps
`/dev/shm/psm_*` segments (RAM). A replica killed hard (SIGKILL, OOM) cannot unlink them, and its engine core
may outlive it for a moment. So every replica writes an owner record on its node, in /dev/shm itself (a
record lives exactly as long as the segments can):

    /dev/shm/lora-pipeline-replica-owners/<replica pid>.json
        {"owner": [pid, start_ticks], "engine": [[pid, start_ticks], ...], "segments": [...], "run_dir": "/tmp/..."}

`sweep()` runs when a replica starts (Serve restarts a killed replica on a node where the dead one lived) and
when `pipeline serve --replicas` stops: for each record whose owner is gone it kills the recorded engine
processes that still run (same pid AND same start time: a recycled pid is never signalled), then removes the
segments and the replica's run folder. Records of live replicas, and segments nobody recorded, are left alone.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

from ground.processes import child_pids, pid_alive, shm_segments_of
from serve.shm_owners import clear_record, records_of_the_dead, start_ticks

log = logging.getLogger(__name__)

OWNERS_DIR = Path("/dev/shm/lora-pipeline-replica-owners")


def _alive(entry) -> bool:
    pid, ticks = int(entry[0]), entry[1]
    return pid_alive(pid) and (ticks is None or start_ticks(pid) == ticks)


class OwnerRecord:
    """The record of this process (a replica): call `refresh()` after the engine started and now and then."""

    def __init__(self, run_dir: str | None, owners_dir: Path = OWNERS_DIR):
        self.pid = os.getpid()
        self.path = owners_dir / f"{self.pid}.json"
        self.run_dir = run_dir
        self.segments: set[str] = set()
        self.engine: dict[int, int | None] = {}
        self.refresh()

    def refresh(self) -> None:
        children = child_pids(self.pid)
        for pid in children:
            self.engine.setdefault(pid, start_ticks(pid))
        self.segments |= shm_segments_of(children | {self.pid})
        data = {"owner": [self.pid, start_ticks(self.pid)], "engine": sorted(self.engine.items()),
                "segments": sorted(self.segments), "run_dir": self.run_dir}
        try:
            self.path.parent.mkdir(mode=0o700, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps(data) + "\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("could not write the replica owner record %s: %s", self.path, exc)

    def forget(self) -> None:
        self.path.unlink(missing_ok=True)


def sweep(owners_dir: Path = OWNERS_DIR, grace_s: float = 10.0) -> list[str]:
    """Clean up after every recorded replica whose process is gone; returns the segments removed."""
    removed: list[str] = []
    for path, data in records_of_the_dead(owners_dir, lambda data: _alive(data["owner"])):
        try:
            engine = [e for e in data.get("engine", []) if _alive(e)]
        except (ValueError, TypeError, IndexError):
            engine = []  # a malformed engine list: its segments and folder still go
        for pid, _ in engine:  # the engine core of a dead replica serves nobody: stop it before taking its memory
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace_s
        while any(_alive(e) for e in engine) and time.monotonic() < deadline:
            time.sleep(0.1)
        gone = clear_record(path, data)
        removed += gone
        log.info("replica pid %s is gone: stopped %d engine process(es), removed %d shared-memory segment(s)",
                 data["owner"][0], len(engine), len(gone))
    return removed
