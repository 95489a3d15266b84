"""The local filesystem store (the embedded default).

Layout under the root (see docs/registry.md):

    ROOT/registry.json                      {"format": 1}
    ROOT/.tmp/                              private work folders: stage-*, file-*, deleted-*
    ROOT/adapters/NAME/.lock                the adapter's file lock (numbering, aliases)
    ROOT/adapters/NAME/last_version         highest number ever given, so deleted numbers are never reused
    ROOT/adapters/NAME/aliases.json         {"prod": 7, ...}, replaced atomically
    ROOT/adapters/NAME/manifests.log        `N SHA256` per version: its manifest.json's digest, append-only
    ROOT/adapters/NAME/route.json           the traffic split (registry/routes.py), replaced atomically
    ROOT/adapters/NAME/history.jsonl        one JSON event per line (registry/history.py), append-only
    ROOT/adapters/NAME/versions/N/          one immutable version

Why it is safe:
- A version is built in ROOT/.tmp (same filesystem), fsynced, and renamed into versions/ in one step, so a
  reader or a crash sees it whole or not at all.
- Numbers are handed out under a `filelock` lock (fcntl: released by the kernel when the holder dies, even
  by SIGKILL), from max(last_version, newest folder) + 1, so concurrent publishers get consecutive numbers and
  a publisher killed between the rename and writing last_version leaves no gap.
- Aliases live in one small JSON file replaced with os.replace: a reader opens the old or the new file.
- Each version's manifest digest is appended to manifests.log before the version becomes visible, and never
  rewritten: weights rewritten together with their manifest.json no longer match the record, so `verify` and the
  server (serve/verified.py) notice (see `recorded_digest_problem`).
- The route is replaced like the alias table; history events are appended under the adapter's lock with one
  write each, so concurrent writers lose none (a writer killed mid-line leaves one torn line, skipped on read).
- Work folders carry host and pid in their name; the next writer removes those whose process is gone
  (or that are older than a day, in case a pid was reused).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock

from ground.errors import RegistryError
from ground.new_files import REGISTRY_MARKER
from ground.processes import pid_alive
from registry.integrity import open_regular, read_regular, verify_folder
from registry.refs import NAME_RE, VERSION_RE
from registry.store import Store

log = logging.getLogger(__name__)

FORMAT = 1
STALE_AFTER_S = 24 * 3600  # leftovers of live-looking pids older than this are removed (pid reuse)
HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


OWN_ROOT_ENTRIES = {".tmp", "adapters", REGISTRY_MARKER}
DIGESTS = "manifests.log"
ROUTE, HISTORY = "route.json", "history.jsonl"


def read_recorded_digests(adapter_dir: Path, ref: str) -> dict[int, str] | None:
    """version -> manifest sha256 from the adapter's manifests.log; None when it has none (older registries).

    The last record of a number wins: a publisher killed after appending but before its rename leaves a record
    whose number the next publish takes again."""
    path = adapter_dir / DIGESTS
    try:
        with open_regular(path, ref) as f:
            st = os.fstat(f.fileno())
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            known = _parsed_digests.get(path)
            if known is not None and known[0] == key:  # `verify` of every version reads it once, not N times
                return known[1]
            text = f.read().decode()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{ref}: {path} is unreadable ({exc}); it records what each version was published "
                            "with. Restore it from a backup or re-publish the adapter.") from None
    records = {}
    for line in text.splitlines():
        number, _, digest = line.partition(" ")
        if VERSION_RE.fullmatch(number) and len(digest) == 64:
            records[int(number)] = digest
    _parsed_digests[path] = (key, records)
    return records


_parsed_digests: dict[Path, tuple[tuple, dict[int, str]]] = {}  # manifests.log -> (its stat, its records)


def recorded_digest_problem(version_dir: Path, ref: str, manifest_bytes: bytes) -> str | None:
    """Whether a local store's version folder still holds the manifest recorded when it was published.

    None when it does, or when there is nothing to compare with (not a local store's version folder, or an
    adapter published before manifests.log existed); else one line saying what differs."""
    version_dir = Path(version_dir)
    if version_dir.parent.name != "versions" or not VERSION_RE.fullmatch(version_dir.name):
        return None
    adapter_dir = version_dir.parent.parent
    records = read_recorded_digests(adapter_dir, ref)
    if not records:
        return None
    version, digest = int(version_dir.name), hashlib.sha256(manifest_bytes).hexdigest()
    recorded = records.get(version)
    if recorded is None:
        if version < min(records):
            return None  # published before the record was kept
        return (f"{ref}: it has no record in {adapter_dir / DIGESTS} (every version published since "
                f"{adapter_dir.name}@{min(records)} has one), so its files cannot be trusted")
    if recorded != digest:
        return (f"{ref}: its manifest.json (sha256 {digest[:16]}...) is not the one recorded when it was published "
                f"({recorded[:16]}... in {adapter_dir / DIGESTS}); its files were rewritten after publishing")
    return None


class LocalStore(Store):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().absolute()
        self.uri = self.root.as_uri()
        self._root_resolved = None
        self._locks: dict[str, FileLock] = {}
        self._locks_guard = threading.Lock()
        fmt = self.root / REGISTRY_MARKER
        if fmt.is_file():
            found = json.loads(fmt.read_text()).get("format")
            if found != FORMAT:
                raise RegistryError(f"Registry `{self.root}` has format {found}; this version reads format {FORMAT}.")

    # ------------------------------------------------------------------------------------------- paths
    def _init_root(self) -> None:
        if not (self.root / REGISTRY_MARKER).is_file():
            # A new registry takes only a new or empty folder (or one a concurrent first publish is setting
            # up): its cleanup would otherwise judge, and its files land among, files that are not its own.
            others = sorted(set(os.listdir(self.root)) - OWN_ROOT_ENTRIES) if self.root.is_dir() else []
            if others or (self.root.exists() and not self.root.is_dir()):
                raise RegistryError(
                    f"`{self.root}` is not a registry (it has no {REGISTRY_MARKER}) and is not empty "
                    f"({', '.join(others[:5]) or 'a file'}); a new registry needs a new or empty folder. Point "
                    "--registry (or PIPELINE_REGISTRY, registry.uri) at one."
                )
            (self.root / ".tmp").mkdir(parents=True, exist_ok=True)
            (self.root / "adapters").mkdir(exist_ok=True)
            self._atomic_write(self.root / REGISTRY_MARKER, json.dumps({"format": FORMAT}) + "\n")

    def _inside(self, path: Path) -> Path:
        """Refuse a path that resolves outside the root (a symlink planted in the store, for instance)."""
        if self._root_resolved is None:
            self._root_resolved = self.root.resolve()
        real = path.resolve()
        if real != self._root_resolved and self._root_resolved not in real.parents:
            raise RegistryError(f"`{path}` resolves to `{real}`, outside the registry root `{self.root}`; refusing.")
        return path

    def _adapter_dir(self, name: str) -> Path:
        return self._inside(self.root / "adapters" / name)

    def _tmp_path(self, kind: str) -> Path:
        return self.root / ".tmp" / f"{kind}-{HOST}-{os.getpid()}-{secrets.token_hex(6)}"

    # ------------------------------------------------------------------------------------------- reading
    def list_adapters(self) -> list[str]:
        base = self.root / "adapters"
        if not base.is_dir():
            return []
        return sorted(d.name for d in base.iterdir() if NAME_RE.fullmatch(d.name) and self.version_numbers(d.name))

    def version_numbers(self, name: str) -> list[int]:
        try:
            entries = os.listdir(self._adapter_dir(name) / "versions")
        except FileNotFoundError:
            return []
        return sorted(int(e) for e in entries if VERSION_RE.fullmatch(e))

    def latest_version(self, name: str) -> int | None:
        """Faster than sorting: one listdir and a max (the resolver calls this per request)."""
        try:
            entries = os.listdir(self._adapter_dir(name) / "versions")
        except FileNotFoundError:
            return None
        return max((int(e) for e in entries if VERSION_RE.fullmatch(e)), default=None)

    def version_dir(self, name: str, version: int) -> Path | None:
        path = self._adapter_dir(name) / "versions" / str(int(version))
        return path if path.is_dir() else None

    def read_aliases(self, name: str) -> dict[str, int]:
        path = self._adapter_dir(name) / "aliases.json"
        try:
            text = read_regular(path, name)
        except FileNotFoundError:
            return {}
        try:
            return {str(k): int(v) for k, v in json.loads(text).items()}
        except (ValueError, AttributeError):
            raise RegistryError(f"Alias table `{path}` is corrupted; fix or delete it and set the aliases again.") from None

    def _read_counter(self, name: str) -> int:
        try:
            return int(read_regular(self._adapter_dir(name) / "last_version", name).strip() or 0)
        except FileNotFoundError:
            return 0

    # ------------------------------------------------------------------------------------------- writing
    def _atomic_write(self, target: Path, text: str) -> None:
        tmp = self._tmp_path("file")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        adir = self._adapter_dir(name)
        with self._locks_guard:
            lock = self._locks.get(name)
            if lock is None:
                self._init_root()
                adir.mkdir(parents=True, exist_ok=True)
                # short poll: under contention (8 publishers) the default 50 ms poll would dominate
                lock = self._locks[name] = FileLock(adir / ".lock", poll_interval=0.002, preserve_lock_file=True)
        with lock:
            yield

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        self._init_root()
        self.cleanup()
        path = self._tmp_path("stage")
        path.mkdir()
        try:
            yield path
        finally:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)

    def commit(self, name: str, staged: Path, finish: Callable[[Path, int | None], None],
               after: Callable[[int], None] | None = None, expect_version: int | None = None) -> int:
        with self.locked(name):
            versions_dir = self._adapter_dir(name) / "versions"
            versions_dir.mkdir(exist_ok=True)
            version = max(self._read_counter(name), self.latest_version(name) or 0) + 1
            if expect_version is not None and version != expect_version:
                raise RegistryError(f"{self.uri}: the next version of `{name}` would be {version}, not "
                                    f"{expect_version}; refusing to renumber it.")
            finish(staged, version)
            fsync_dir(staged)
            self._record_digest(name, version, staged)
            os.rename(staged, versions_dir / str(version))  # atomic; refuses to replace a non-empty folder
            fsync_dir(versions_dir)
            self._atomic_write(self._adapter_dir(name) / "last_version", f"{version}\n")
            if after is not None:
                after(version)
        return version

    def _record_digest(self, name: str, version: int, staged: Path) -> None:
        """Append `version sha256(manifest.json)` to manifests.log (under the adapter's lock, before the rename)."""
        digest = hashlib.sha256(read_regular(staged / "manifest.json", f"{name}@{version}")).hexdigest()
        fd = os.open(self._adapter_dir(name) / DIGESTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{version} {digest}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def verify_version(self, ref: str, name: str, version: int) -> list[str]:
        """The folder against its manifest, and the manifest against the digest recorded at publish."""
        path = self.version_dir(name, version)
        if path is None:
            return [f"{ref} does not exist"]
        problems = verify_folder(ref, path)
        try:
            problem = recorded_digest_problem(path, ref, read_regular(path / "manifest.json", ref))
        except OSError:
            problem = None  # a missing manifest is already reported
        except RegistryError as exc:
            problem = str(exc)
        if problem and problem not in problems:
            problems.append(problem)
        return problems

    def update_aliases(self, name: str, change: Callable[[dict[str, int]], dict[str, int]]) -> dict[str, int]:
        with self.locked(name):
            new = change(self.read_aliases(name))
            self._atomic_write(self._adapter_dir(name) / "aliases.json", json.dumps(new, indent=1, sort_keys=True) + "\n")
            return new

    def read_route(self, name: str) -> dict | None:
        path = self._adapter_dir(name) / ROUTE
        try:
            return json.loads(read_regular(path, name))
        except FileNotFoundError:
            return None
        except ValueError:
            raise RegistryError(f"Route file `{path}` is corrupted; delete it and set the route again "
                                f"(`pipeline registry route set {name} ...`).") from None

    def write_route(self, name: str, record: dict) -> None:
        with self.locked(name):
            self._atomic_write(self._adapter_dir(name) / ROUTE, json.dumps(record, indent=1) + "\n")

    def append_event(self, name: str, event_json: str) -> None:
        with self.locked(name):
            fd = os.open(self._adapter_dir(name) / HISTORY, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                # after a writer killed mid-line, start on a fresh line so this event is not glued to the torn one
                torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
                os.write(fd, (("\n" if torn else "") + event_json + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)

    def read_events(self, name: str) -> list[dict]:
        try:
            text = read_regular(self._adapter_dir(name) / HISTORY, name).decode(errors="replace")
        except FileNotFoundError:
            return []
        events = []
        for line in text.splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:  # a writer killed in the middle of its line
                log.debug("skipping a torn history line of %s: %.80s", name, line)
        return events

    def retire_numbers(self, name: str, upto: int) -> None:
        with self.locked(name):
            if upto > max(self._read_counter(name), self.latest_version(name) or 0):
                self._atomic_write(self._adapter_dir(name) / "last_version", f"{int(upto)}\n")

    def remove_version(self, name: str, version: int, check: Callable[[dict[str, int]], dict[str, int]]) -> None:
        with self.locked(name):
            path = self.version_dir(name, version)
            if path is None:
                raise RegistryError(f"{name}@{version} does not exist.")
            old = self.read_aliases(name)
            new = check(old)
            if new != old:
                self.update_aliases(name, lambda _: new)
            # keep the number used forever, then move the folder out of sight in one step before deleting it
            self._atomic_write(self._adapter_dir(name) / "last_version",
                               f"{max(self._read_counter(name), self.latest_version(name) or 0)}\n")
            gone = self._tmp_path("deleted")
            os.rename(path, gone)
            fsync_dir(path.parent)
        shutil.rmtree(gone, ignore_errors=True)

    def cleanup(self, max_age_s: float | None = None) -> list[str]:
        tmp = self.root / ".tmp"
        try:
            entries = os.listdir(tmp)
        except FileNotFoundError:
            return []
        removed, now = [], time.time()
        stale_after = STALE_AFTER_S if max_age_s is None else max_age_s
        for entry in entries:
            parts = entry.split("-")
            if len(parts) != 4 or not parts[2].isdigit():
                continue
            _, host, pid, _ = parts
            path = tmp / entry
            try:
                age = now - path.lstat().st_mtime
            except FileNotFoundError:
                continue
            dead = host == HOST and int(pid) != os.getpid() and not pid_alive(int(pid))
            if dead or age > stale_after:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(f"{path} (age {age:.0f} s, writer pid {pid} {'gone' if dead else 'too old'})")
                log.debug("removed leftover %s (age %.0f s)", path, age)
        return removed
