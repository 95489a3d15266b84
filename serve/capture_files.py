"""The capture's files: the folder checked at start, and the append-only JSONL shards (one writer per process).

    DIR/capture.json                   {"format": "lora-pipeline-capture/1", "created": ...}, written once
    DIR/records/HOST-PID-MS-SEQ.jsonl  one request record per line
    DIR/feedback/HOST-PID-MS-SEQ.jsonl one feedback record per line

Every line is fsynced before `write` returns; shards are opened O_APPEND|O_EXCL, rotated by size, never rewritten.
What goes into a line is serve/capture.py's business.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import threading
import time
from pathlib import Path

from ground.capture_records import utc_now
from ground.errors import StageError

FOLDER_FORMAT = "lora-pipeline-capture/1"
MIN_FREE_BYTES = 64 << 20  # below this at start the disk is as good as full: a shard or two and it is


def prepare_folder(path: str | os.PathLike, setting: str = "--capture") -> Path:
    """Create the capture folder (0700) and its two shard folders; prove they take a write and have room.
    Raises StageError naming the folder, the `setting` it came from and the fix."""
    folder = Path(path).expanduser().absolute()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for sub in ("records", "feedback"):
            (folder / sub).mkdir(mode=0o700, exist_ok=True)
            probe = folder / sub / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"probe\n")
                os.fsync(fd)
            finally:
                os.close(fd)
                probe.unlink(missing_ok=True)
        _write_folder_marker(folder)
    except OSError as exc:
        raise StageError(f"The capture folder {folder} is not writable ({exc.strerror or exc}); set {setting} to "
                         "a folder this user can create and write (or fix its permissions).") from None
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise StageError(f"The capture folder {folder} is on a disk with {free >> 20} MiB free, under the "
                         f"{MIN_FREE_BYTES >> 20} MiB a capture needs; free space or set {setting} to another folder.")
    return folder


def _write_folder_marker(folder: Path) -> None:
    marker = folder / "capture.json"
    if marker.exists():
        return
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process of the same capture wrote it first
        return
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"format": FOLDER_FORMAT, "created": utc_now()}) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------- shards
class ShardWriter:
    """Appends JSON lines to DIR/<kind>/HOST-PID-MS-SEQ.jsonl; one per process and kind; thread-safe.
    `write` returns False (and the caller counts a lost line) when the line could not be made durable."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = folder
        self.max_bytes = max_bytes
        self.prefix = f"{socket.gethostname()}-{os.getpid()}-{int(time.time() * 1000)}"
        self.seq = 0
        self._fd: int | None = None
        self._size = 0
        self._lock = threading.Lock()
        self.last_error: OSError | None = None  # why the last failed write failed (the capture logs it once)

    def write(self, line: bytes) -> bool:
        with self._lock:
            try:
                if self._fd is None or (self._size and self._size + len(line) > self.max_bytes):
                    self._open_next()
                written = os.write(self._fd, line)
                self._size += written
                if written != len(line):
                    raise OSError(f"short write ({written} of {len(line)} bytes)")
                os.fsync(self._fd)
                return True
            except OSError as exc:
                self._close()  # the next line starts a new shard: this one may end in a partial line
                self.last_error = exc
                return False

    def _open_next(self) -> None:
        self._close()
        self.seq += 1
        path = self.folder / f"{self.prefix}-{self.seq:05d}.jsonl"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o600)
        self._size = 0

    def _close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
