"""What a replica leaves on its node, and who removes it.

A replica is a Ray actor process that owns one vLLM engine; the engine's core runs in a child process and maps
`/dev/shm/psm_*` segments (RAM). Those segments outlive whatever kills the engine hard: a SIGKILL or OOM kill
of the replica or its engine core, and vLLM's own shutdown, which force-kills an engine core (and its worker)
that has not exited 5 s after SIGTERM, as a busy engine on a loaded machine does. So every replica writes an
owner record on its node, in /dev/shm itself (a record lives exactly as long as the segments can):

    /dev/shm/lora-pipeline-replica-owners/<replica pid>.json
        {"owner": [pid, start_ticks], "engine": [[pid, start_ticks], ...], "segments": [...], "run_dir": "/tmp/...",
         "app": "<token of the `pipeline serve` run that started it>"}

A record is removed only after its segments are: by the replica itself when Serve stops it (`release()`, after
`engine.shutdown()`), else by `sweep()`, which runs when a replica starts (Serve restarts a killed replica on a
node where the dead one lived) and when `pipeline serve --replicas` stops. For each record whose owner is gone
it kills the recorded engine processes that still run (same pid AND same start time: a recycled pid is never
signalled), then removes the segments and the replica's run folder. Records of live replicas, and segments
nobody recorded, are left alone.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

from ground.new_files import write_new_text
from ground.processes import child_pids, pid_alive, shm_segments_of
from serve.shm_owners import clear_record, records_of_the_dead, start_ticks

log = logging.getLogger(__name__)

OWNERS_DIR = Path("/dev/shm/lora-pipeline-replica-owners")


def _alive(entry) -> bool:
    pid, ticks = int(entry[0]), entry[1]
    return pid_alive(pid) and (ticks is None or start_ticks(pid) == ticks)


def _stop_engine(data: dict, grace_s: float) -> int:
    """SIGKILL the recorded engine processes that still run (same pid and start time); wait up to `grace_s` for
    them to go. Returns how many were signalled."""
    try:
        engine = [e for e in data.get("engine", []) if _alive(e)]
    except (ValueError, TypeError, IndexError):
        return 0  # a malformed engine list: its segments and folder still go
    for pid, _ in engine:  # an engine core without its replica serves nobody: stop it before taking its memory
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace_s
    while any(_alive(e) for e in engine) and time.monotonic() < deadline:
        time.sleep(0.1)
    return len(engine)


class OwnerRecord:
    """The record of this process (a replica): call `refresh()` after the engine started and now and then, and
    `release()` once the engine was shut down."""

    def __init__(self, run_dir: str | None, owners_dir: Path = OWNERS_DIR, app: str | None = None):
        self.pid = os.getpid()
        self.path = owners_dir / f"{self.pid}.json"
        self.run_dir = run_dir
        self.app = app
        self.segments: set[str] = set()
        self.engine: dict[int, int | None] = {}
        self._written: dict | None = None
        self._released = False  # after release() the record stays deleted (a late refresh must not rewrite it)
        self._lock = threading.Lock()  # refreshed from the engine-start watcher thread and from the replica
        self.refresh()

    def data(self) -> dict:
        return {"owner": [self.pid, start_ticks(self.pid)], "engine": sorted(self.engine.items()),
                "segments": sorted(self.segments), "run_dir": self.run_dir, "app": self.app}

    def refresh(self) -> None:
        """Add the processes below this one and the segments they map now; rewrite the record if that changed.
        Segments and processes are only ever added: one that is gone costs nothing to remove later."""
        with self._lock:
            if self._released:
                return
            children = child_pids(self.pid)
            for pid in children:
                self.engine.setdefault(pid, start_ticks(pid))
            self.segments |= shm_segments_of(children | {self.pid})
            data = self.data()
            if data == self._written:
                return
            try:
                self.path.parent.mkdir(mode=0o700, exist_ok=True)
                write_new_text(self.path, json.dumps(data) + "\n", replace=True)
                self._written = data
            except OSError as exc:
                log.warning("could not write the replica owner record %s: %s", self.path, exc)

    def watch(self, every_s: float = 1.0) -> threading.Event:
        """Refresh every `every_s` in a thread until the returned event is set (while the engine starts: a
        replica killed then still has its engine's first segments on record)."""
        done = threading.Event()

        def loop():
            while not done.wait(every_s):
                self.refresh()

        threading.Thread(target=loop, name="owner-record", daemon=True).start()
        return done

    def release(self, grace_s: float = 10.0) -> list[str]:
        """After the engine was shut down: stop its processes that still run (vLLM's shutdown may have left
        them, or force-killed them and left their segments), remove the recorded segments and the run folder,
        and only then the record. Returns the segments removed."""
        self.refresh()  # processes or segments that appeared since the last refresh
        with self._lock:
            self._released = True
            data = self.data()
        stopped = _stop_engine(data, grace_s)
        gone = clear_record(self.path, data)
        if stopped or gone:  # a warning: vLLM's shutdown did not leave the engine clean
            log.warning("replica pid %d: stopped %d engine process(es) left running, removed %d shared-memory "
                        "segment(s) its engine left", self.pid, stopped, len(gone))
        return gone


def records(owners_dir: Path = OWNERS_DIR) -> list[dict]:
    """Every readable record in `owners_dir`."""
    found = []
    for path in sorted(owners_dir.glob("*.json")) if owners_dir.is_dir() else []:
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return found


def wait_for_owners(app: str, timeout_s: float, owners_dir: Path = OWNERS_DIR) -> list[int]:
    """Wait until no live replica of the run `app` is recorded on this node; returns the pids still alive at
    the timeout (their records are then left for a later sweep)."""
    deadline = time.monotonic() + timeout_s
    while True:
        live = [int(r["owner"][0]) for r in records(owners_dir) if r.get("app") == app and _alive(r["owner"])]
        if not live or time.monotonic() >= deadline:
            return live
        time.sleep(0.2)


def sweep(owners_dir: Path = OWNERS_DIR, grace_s: float = 10.0) -> list[str]:
    """Clean up after every recorded replica whose process is gone; returns the segments removed."""
    removed: list[str] = []
    for path, data in records_of_the_dead(owners_dir, lambda data: _alive(data["owner"])):
        stopped = _stop_engine(data, grace_s)
        gone = clear_record(path, data)
        removed += gone
        log.info("replica pid %s is gone: stopped %d engine process(es), removed %d shared-memory segment(s)",
                 data["owner"][0], stopped, len(gone))
    return removed
