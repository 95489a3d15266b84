"""The suite's own /dev/shm leaks, found at the end of the session.

vLLM engines map `/dev/shm/psm_*` segments (RAM, 160-250 MiB each); whatever starts an engine must remove them,
also when the engine is killed. Other programs (and other people's test runs on a shared machine) create and
leak such segments too, so a segment counts as this session's leak only when all of these hold at the end:

- it was not there when the session started (same name and inode),
- no live process maps it or holds it open (a running engine's segment is not a leak, whoever owns it),
- a process of this session was seen mapping it: every process the suite starts inherits `MARK_ENV` (Ray
  workers and vLLM engine processes too, through their parents' environment), and a thread looks every
  `every_s` at the segments the marked processes map.

A segment that was created during the session and is mapped by nobody but was never seen in one of our
processes is reported, not failed: it may be another run's.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from ground.processes import SHM_SEGMENT_PREFIX, child_pids, shm_segments_of, stat_field

MARK_ENV = "LORA_PIPELINE_TEST_SESSION"
SHM_DIR = Path(SHM_SEGMENT_PREFIX).parent
SHM_GLOB = Path(SHM_SEGMENT_PREFIX).name + "*"


def _segments() -> dict[str, int]:
    """{path: inode} of the psm_* segments in /dev/shm now."""
    found = {}
    for path in SHM_DIR.glob(SHM_GLOB):
        try:
            found[str(path)] = path.stat().st_ino
        except OSError:
            continue
    return found


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


class ShmGuard:
    def __init__(self, every_s: float = 3.0):
        self.mark = f"{os.getpid()}-{time.time_ns()}"
        os.environ[MARK_ENV] = self.mark  # inherited by everything the suite starts from here on
        self.every_s = every_s
        self.before = _segments()
        self.seen: set[str] = set()  # segments a process of this session mapped at some point
        self._marked: dict[tuple[int, str | None], bool] = {}  # (pid, start time) -> has our mark
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="shm-guard", daemon=True)

    def start(self) -> "ShmGuard":
        self._thread.start()
        return self

    def _is_ours(self, pid: int) -> bool:
        key = (pid, stat_field(pid, 19))
        if key not in self._marked:
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    self._marked[key] = f"{MARK_ENV}={self.mark}\0".encode() in f.read()
            except OSError:
                self._marked[key] = False
        return self._marked[key]

    def sample(self) -> None:
        ours = {pid for pid in _pids() if self._is_ours(pid)} | child_pids() | {os.getpid()}
        self.seen |= shm_segments_of(ours)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.sample()
            except Exception:  # a sampler must never take the suite down; the final check still runs
                pass

    def finish(self) -> tuple[list[str], list[str]]:
        """(this session's leaked segments, unattributed ones), each as 'path (N MiB)'."""
        self._stop.set()
        self._thread.join(timeout=30)
        self.sample()
        new = {path for path, inode in _segments().items() if self.before.get(path) != inode}
        leaked = new - shm_segments_of(_pids()) if new else set()

        def sized(paths):
            out = []
            for path in sorted(paths):
                try:
                    out.append(f"{path} ({os.path.getsize(path) / 2**20:.0f} MiB)")
                except OSError:
                    continue  # removed meanwhile: not a leak
            return out

        return sized(leaked & self.seen), sized(leaked - self.seen)
