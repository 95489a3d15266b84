"""Processes and the shared memory they leave behind.

vLLM's engine talks to its workers through `/dev/shm/psm_*` segments. /dev/shm is RAM, and a process killed
with SIGKILL cannot remove its segments, so whoever starts engines records which segments they mapped and
removes them once the owners are gone. Owner files (`HOST PID`) mark folders a process made, so a later run
can tell a dead run's leftovers from a live run's files.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

log = logging.getLogger(__name__)

SHM_SEGMENT_PREFIX = "/dev/shm/psm_"


def stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (0: state, 1: parent pid, 3: session id, 19: start
    time in clock ticks since boot); None when the process is gone or the file cannot be read. The name is cut
    at its last ")" because a command name may itself hold spaces and parentheses."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def stat_field(pid: int, index: int) -> str | None:
    """Field `index` of `stat_fields(pid)`; None when the process is gone."""
    fields = stat_fields(pid)
    return fields[index] if fields is not None and index < len(fields) else None


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a running process. A zombie (killed, not yet reaped) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists; it is just not ours to signal
    return stat_field(pid, 0) != "Z"  # unreadable (None) counts as alive: kill(0) just said it exists


def child_pids(pid: int | None = None) -> set[int]:
    """Pids of every descendant of `pid` (default: this process)."""
    import psutil

    try:
        return {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def shm_segments_of(pids) -> set[str]:
    """`/dev/shm/psm_*` files that these processes have mapped or hold open."""
    found: set[str] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    if SHM_SEGMENT_PREFIX in line:
                        found.add(line.split(None, 5)[-1].strip().removesuffix(" (deleted)"))
        except OSError:
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(SHM_SEGMENT_PREFIX):
                    found.add(target.removesuffix(" (deleted)"))
        except OSError:
            continue
    return found


def remove_files(paths) -> int:
    """Remove each file that still exists; returns how many were removed. A file that cannot be removed is
    logged and skipped: cleanup must not turn a shutdown into a crash."""
    removed = 0
    for path in paths:
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s: %s", path, exc)
    return removed


def write_owner(path: str | os.PathLike, pid: int | None = None) -> None:
    """Record this host and `pid` (default: this process) as the owner of whatever `path` marks."""
    Path(path).write_text(f"{socket.gethostname()} {os.getpid() if pid is None else pid}")


def owner_gone(path: str | os.PathLike) -> bool:
    """True only when `path` names an owner on this host whose process no longer runs. A missing or unreadable
    owner file, or an owner on another host, is not ours to judge: False."""
    try:
        host, pid = Path(path).read_text().split()
        return host == socket.gethostname() and int(pid) != os.getpid() and not pid_alive(int(pid))
    except (OSError, ValueError):
        return False
