"""A verified local cache of remote adapter versions, one per machine and server.

    ROOT/<server-hash>/server.txt                     which server this folder caches
    ROOT/<server-hash>/versions/NAME/V-<ident>/       one version's files, exactly as the manifest lists them
    ROOT/<server-hash>/locks/NAME@V-<ident>.lock      held while that version is downloaded
    ROOT/<server-hash>/.tmp/fill-HOST-PID-RAND/       downloads in progress

`ident` is what makes a number unambiguous: the id of the upload the version was created from. A registered
model that is deleted and created again restarts its numbers at 1; keyed by ident, the old `NAME/1` can never be
mistaken for the new one.

Why it is safe:
- A folder appears under versions/ by one rename, after every file was downloaded, fsynced and checked against
  the manifest's sha256; a reader sees it whole or not at all, and a download that fails leaves nothing there.
- Several processes (the server's resolver, an export, a training run) may ask for the same version at once:
  one downloads under a `filelock` lock, the others wait and then find it.
- File names come from the manifest (a tag anyone with write access to the server can rewrite): each is checked
  against the files a version holds before it is joined to a folder (registry.integrity.manifest_files), so no
  download lands outside the cache.
- A hit costs a stat per file (sizes must match the manifest), and the first hit of a folder in each process
  re-hashes it: a cached file whose bytes changed but whose size did not is never handed out. A folder found
  damaged is moved out of the way and downloaded again; `Registry.verify` re-hashes too.
- Cleaned by size: after each download, least-recently-used folders (by mtime, which every hit refreshes) are
  removed until the cache is under its cap, except those used within `min_idle_s`, because a running vLLM server
  may re-read an adapter folder it loaded earlier (when it drops the adapter from its CPU cache and needs it back).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

from filelock import FileLock

from ground.errors import RegistryError
from ground.processes import pid_alive
from registry.integrity import CACHE_MARKER as VERIFIED
from registry.integrity import NotARegularFileError, hash_regular, manifest_files
from registry.local import HOST, fsync_dir

log = logging.getLogger(__name__)

DEFAULT_ROOT = "~/.cache/lora-pipeline/registry"
DEFAULT_MAX_GB = 20.0
DEFAULT_MIN_IDLE_S = 600.0


def cache_root(explicit=None) -> Path:
    """`explicit` > $PIPELINE_REGISTRY_CACHE > ~/.cache/lora-pipeline/registry."""
    return Path(explicit or os.environ.get("PIPELINE_REGISTRY_CACHE") or DEFAULT_ROOT).expanduser().absolute()


def cache_max_bytes(explicit=None) -> int:
    """`explicit` (bytes) > $PIPELINE_REGISTRY_CACHE_MAX_GB > 20 GB."""
    if explicit is not None:
        return int(explicit)
    text = os.environ.get("PIPELINE_REGISTRY_CACHE_MAX_GB")
    try:
        return int(float(text) * 1e9) if text else int(DEFAULT_MAX_GB * 1e9)
    except ValueError:
        raise RegistryError(f"PIPELINE_REGISTRY_CACHE_MAX_GB={text!r} is not a number of gigabytes (e.g. 20).") from None


class VersionCache:
    def __init__(self, root: Path, server: str, max_bytes: int, min_idle_s: float = DEFAULT_MIN_IDLE_S):
        self.root = Path(root) / hashlib.sha256(server.encode()).hexdigest()[:16]
        self.server = server
        self.max_bytes = max_bytes
        self.min_idle_s = min_idle_s
        self._hashed: set[Path] = set()  # folders this process has hashed (at download or first hit)
        self._hashed_guard = threading.Lock()

    def _init(self) -> None:
        if not (self.root / "server.txt").is_file():
            for sub in ("versions", "locks", ".tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            (self.root / "server.txt").write_text(self.server + "\n")

    def folder(self, name: str, version: int, ident: str) -> Path:
        return self.root / "versions" / name / f"{int(version)}-{ident[:16]}"

    def tmp_folder(self) -> Path:
        """A private work folder on the cache's filesystem (so that moving it into place is a rename)."""
        self._init()
        path = self.root / ".tmp" / f"fill-{HOST}-{os.getpid()}-{secrets.token_hex(6)}"
        path.mkdir()
        return path

    # ------------------------------------------------------------------------------------------- reading
    def get(self, name: str, version: int, ident: str, manifest: dict) -> Path | None:
        """The cached folder when it is there and its files match the manifest; refreshes its LRU time.

        Sizes are checked on every hit, hashes on the first hit in this process (a byte flipped in place keeps
        the size)."""
        ref = f"{name}@{version}"
        files = manifest_files(ref, manifest, f"the manifest of {ref} on {self.server}")
        path = self.folder(name, version, ident)
        if not (path / VERIFIED).is_file():
            return None
        with self._hashed_guard:
            hashed = path in self._hashed
        intact = True
        for fname, entry in files.items():
            try:
                if (path / fname).stat().st_size != entry["size"]:
                    intact = False
                elif not hashed and hash_regular(path / fname, ref)[0] != entry["sha256"]:
                    intact = False
            except (FileNotFoundError, NotARegularFileError):
                intact = False
            if not intact:
                break
        if intact:
            with self._hashed_guard:
                self._hashed.add(path)
            try:
                os.utime(path)
            except OSError:
                pass
            return path
        log.warning("cached copy of %s@%d in %s is damaged; downloading it again", name, version, path)
        with self._hashed_guard:
            self._hashed.discard(path)
        self.discard(path)
        return None

    # ------------------------------------------------------------------------------------------- filling
    def fill(self, name: str, version: int, ident: str, manifest: dict,
             download: Callable[[str, Path], str]) -> Path:
        """Download the version (`download(fname, dst) -> sha256`) unless cached; verify; publish by rename."""
        found = self.get(name, version, ident, manifest)
        if found is not None:
            return found
        self._init()
        with FileLock(self.root / "locks" / f"{name}@{int(version)}-{ident[:16]}.lock"):
            found = self.get(name, version, ident, manifest)  # another process may have filled it meanwhile
            if found is not None:
                return found
            tmp = self.tmp_folder()
            try:
                for fname, entry in sorted(manifest_files(f"{name}@{version}", manifest, "its manifest").items()):
                    got = download(fname, tmp / fname)
                    if got != entry["sha256"]:
                        raise RegistryError(
                            f"{name}@{version} on {self.server}: {fname} does not match its manifest (sha256 "
                            f"{got[:16]}..., manifest says {entry['sha256'][:16]}...). The stored files are damaged; "
                            f"it is not served or exported. Run `pipeline registry verify {name}@{version}` and "
                            "re-publish it.")
                self._seal(tmp, manifest)
                self._place(tmp, self.folder(name, version, ident))
                with self._hashed_guard:
                    self._hashed.add(self.folder(name, version, ident))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        self.evict()
        return self.folder(name, version, ident)

    def adopt(self, name: str, version: int, ident: str, folder: Path, manifest: dict) -> None:
        """Move a folder the publisher already verified (its own upload) into the cache; best effort."""
        try:
            self._init()
            self._seal(folder, manifest)
            with FileLock(self.root / "locks" / f"{name}@{int(version)}-{ident[:16]}.lock"):
                if not self.folder(name, version, ident).exists():
                    self._place(folder, self.folder(name, version, ident))
        except OSError as exc:
            log.debug("could not keep %s@%d in the cache: %s", name, version, exc)

    def _seal(self, folder: Path, manifest: dict) -> None:
        for fname in manifest_files(folder.name, manifest, "its manifest"):
            with open(folder / fname, "rb") as f:
                os.fsync(f.fileno())
        with open(folder / VERIFIED, "w") as f:
            json.dump({"verified_unix": time.time(), "manifest": manifest}, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(folder)

    @staticmethod
    def _place(tmp: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # a damaged copy: out of the way in one step, then gone
            VersionCache.discard(target)
        os.rename(tmp, target)
        fsync_dir(target.parent)

    @staticmethod
    def discard(path: Path) -> None:
        gone = path.with_name(f".gone-{path.name}-{secrets.token_hex(4)}")
        try:
            os.rename(path, gone)
        except FileNotFoundError:
            return
        shutil.rmtree(gone, ignore_errors=True)

    # ------------------------------------------------------------------------------------------- cleaning
    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, folder) of every cached version."""
        out = []
        base = self.root / "versions"
        if not base.is_dir():
            return out
        for adapter in base.iterdir():
            for folder in adapter.iterdir() if adapter.is_dir() else []:
                if folder.name.startswith(".") or not (folder / VERIFIED).is_file():
                    continue
                try:
                    size = sum(f.stat().st_size for f in folder.iterdir())
                    out.append((folder.stat().st_mtime, size, folder))
                except FileNotFoundError:  # evicted by another process meanwhile
                    continue
        return out

    def evict(self) -> list[Path]:
        """Remove least-recently-used versions until the cache holds at most max_bytes; returns what went."""
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        if total <= self.max_bytes:
            return []
        removed, now = [], time.time()
        with FileLock(self.root / "locks" / ".evict.lock"):
            for used, size, folder in sorted(entries):
                if total <= self.max_bytes:
                    break
                if now - used < self.min_idle_s:
                    continue
                self.discard(folder)
                total -= size
                removed.append(folder)
        if removed:
            log.info("registry cache %s: removed %d least-recently-used version(s) to stay under %.2f GB",
                     self.root, len(removed), self.max_bytes / 1e9)
        return removed

    def cleanup(self) -> list[Path]:
        """Remove downloads left by processes that died on this host; returns them."""
        tmp, removed = self.root / ".tmp", []
        try:
            entries = os.listdir(tmp)
        except FileNotFoundError:
            return []
        for entry in entries:
            parts = entry.split("-")
            if len(parts) == 4 and parts[1] == HOST and parts[2].isdigit() and int(parts[2]) != os.getpid() \
                    and not pid_alive(int(parts[2])):
                shutil.rmtree(tmp / entry, ignore_errors=True)
                removed.append(tmp / entry)
        return removed
