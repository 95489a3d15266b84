"""Integrity of stored versions: the manifest (sha256 + size of every file) and its verification."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ground.adapter_files import VERSION_MANIFEST, VERSION_METADATA, check_version_files, version_file_path
from ground.errors import RegistryError
from registry.validate import CONFIG, WEIGHTS

METADATA = VERSION_METADATA
MANIFEST = VERSION_MANIFEST
PAYLOAD = (WEIGHTS, CONFIG)
CACHE_MARKER = ".verified"  # written by registry/cache.py into a cached copy it has checked
CHUNK = 8 << 20


@dataclass
class VerifyReport:
    """What `verify` found: versions checked and one line per problem (empty when all is well)."""

    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checked": self.checked, "problems": self.problems}


class NotARegularFileError(RegistryError):
    """A registry file is a FIFO, a device, a socket or a folder: reading it could block forever."""


def open_regular(path: Path, ref: str):
    """Open `path` for reading only if it is a regular file (checked on the open handle, so no swap in between).

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer; for a regular file it changes
    nothing. A FIFO or device planted where a version's file was would otherwise hang the reader (a request of
    the server, `verify`) with no answer.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "not a regular file"
            raise NotARegularFileError(f"{ref}: {path} is {kind}, not a regular file; refusing to read it. Delete the "
                                       f"version and publish it again (`pipeline registry verify {ref}` lists what "
                                       "else is wrong).")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Path, ref: str) -> bytes:
    with open_regular(path, ref) as f:
        return f.read()


def hash_regular(path: Path, ref: str) -> tuple[str, int]:
    """(sha256, size) of a regular file; NotARegularFileError for anything else."""
    h, size = hashlib.sha256(), 0
    with open_regular(path, ref) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def manifest_files(ref: str, manifest, where: str) -> dict:
    """The manifest's {file name: entry}, every name checked (see ground.adapter_files.check_version_files)."""
    try:
        files = manifest["files"]
        items = list(files.items())
    except (KeyError, TypeError, AttributeError):
        raise RegistryError(f"Adapter version {ref} is refused: {where} has no `files` table; delete the version and "
                            "publish it again.") from None
    check_version_files(ref, [name for name, _ in items], where)
    return files


def verify_folder(ref: str, path: Path) -> list[str]:
    """Recompute the hashes of one version folder against its manifest; one line per problem."""
    problems = []
    try:
        manifest = json.loads(read_regular(path / MANIFEST, ref))
        files = manifest_files(ref, manifest, f"{path / MANIFEST}")
    except RegistryError as exc:
        return [str(exc)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{ref}: {MANIFEST} is missing or unreadable ({exc.__class__.__name__}: {exc})"]
    for fname, entry in sorted(files.items()):
        try:
            fpath = version_file_path(path, ref, fname, f"{path / MANIFEST}")
            digest, _ = hash_regular(fpath, ref)
        except FileNotFoundError:
            problems.append(f"{ref}: {fname} is missing")
            continue
        except RegistryError as exc:
            problems.append(str(exc))
            continue
        if not isinstance(entry, dict) or digest != entry.get("sha256"):
            entry = entry if isinstance(entry, dict) else {}
            problems.append(f"{ref}: {fname} is corrupted (sha256 {digest[:16]}..., manifest says "
                            f"{str(entry.get('sha256'))[:16]}...)")
    for extra in sorted(set(os.listdir(path)) - set(files) - {MANIFEST, CACHE_MARKER}):
        problems.append(f"{ref}: unexpected file {extra} (not in the manifest)")
    for required in (*PAYLOAD, METADATA):
        if required not in files:
            problems.append(f"{ref}: the manifest does not list {required}")
    return problems
