"""Owner records for the shared memory of servers, so a server that died hard is cleaned up by the next start.

vLLM's engine processes map `/dev/shm/psm_*` segments (hundreds of MiB) and unlink them on a clean exit. A
SIGKILL of the whole server (an OOM kill, `kill -9` of its process group, a container stop past its grace)
leaves them behind, and /dev/shm is RAM. So a running server is recorded with the segments it maps, in
/dev/shm itself (a record then lives exactly as long as the segments can: both go at reboot):

    /dev/shm/lora-pipeline-serve-owners/<session id>.json
        {"session": 4242, "start_ticks": 123456, "segments": ["/dev/shm/psm_..."], "run_dir": "/tmp/..."}

`remove_orphans()`, called when a server starts, removes the segments (and the run folder with its verified
adapter copies) of every recorded server whose processes are all gone. A session counts as alive while any
process of it lives, and its leader's start time guards against a recycled pid. Segments of servers that are
not recorded (another program's engines) are never touched.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from ground.new_files import write_new_text
from ground.processes import remove_files, stat_field

log = logging.getLogger(__name__)

OWNERS_DIR = Path("/dev/shm/lora-pipeline-serve-owners")
SEGMENT_RE = re.compile(r"/dev/shm/psm_[A-Za-z0-9_]+")


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None when it is gone."""
    ticks = stat_field(pid, 19)
    return int(ticks) if ticks is not None else None


def record(session_id: int, segments: set[str], run_dir: str | None) -> None:
    """Write (or rewrite) the record of a live server's session."""
    OWNERS_DIR.mkdir(mode=0o700, exist_ok=True)
    data = {"session": session_id, "start_ticks": start_ticks(session_id), "segments": sorted(segments),
            "run_dir": run_dir}
    write_new_text(OWNERS_DIR / f"{session_id}.json", json.dumps(data) + "\n", replace=True)


def forget(session_id: int) -> None:
    (OWNERS_DIR / f"{session_id}.json").unlink(missing_ok=True)


def _session_alive(data: dict, session_pids) -> bool:
    sid = int(data["session"])
    ticks = start_ticks(sid)
    if ticks is not None and data.get("start_ticks") not in (None, ticks):
        return False  # the pid was recycled by another process: the server is gone
    return bool(session_pids(sid))


def records_of_the_dead(owners_dir: Path, alive) -> list[tuple[Path, dict]]:
    """(record path, record) for every readable owner record in `owners_dir` that `alive(record)` calls dead.
    An unreadable or malformed record is not ours to judge and is skipped."""
    try:
        paths = sorted(owners_dir.glob("*.json"))
    except OSError:
        return []
    dead = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
            if not alive(data):
                dead.append((path, data))
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue
    return dead


def clear_record(path: Path, data: dict) -> list[str]:
    """Remove what a dead owner recorded: its /dev/shm segments (only names that look like vLLM's), its run
    folder (only a `pipeline-serve-run-*` one), then the record itself, but only once none of its segments is
    left (a record deleted first would leave segments that no later start can attribute). Returns the segments
    removed."""
    from serve.verified import _remove_tree

    ours = [s for s in data.get("segments", []) if SEGMENT_RE.fullmatch(s)]
    gone = [s for s in ours if os.path.exists(s)]
    remove_files(gone)
    run_dir = data.get("run_dir")
    if run_dir and Path(run_dir).name.startswith("pipeline-serve-run-"):
        _remove_tree(Path(run_dir))
    left = [s for s in ours if os.path.exists(s)]
    if left:
        log.warning("kept the owner record %s: could not remove %s", path, ", ".join(left))
    else:
        path.unlink(missing_ok=True)
    return [s for s in gone if s not in left]


def remove_orphans(session_pids) -> list[str]:
    """Remove what dead recorded servers left behind; returns the segments removed.

    `session_pids(sid)` lists the live processes of a session (serve.server passes its own scanner).
    """
    removed: list[str] = []
    for path, data in records_of_the_dead(OWNERS_DIR, lambda data: _session_alive(data, session_pids)):
        gone = clear_record(path, data)
        removed += gone
        log.info("server session %s is gone: removed %d shared-memory segment(s) it left in /dev/shm",
                 data["session"], len(gone))
    return removed
