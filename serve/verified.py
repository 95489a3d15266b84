"""Verified weights: the engine loads a version only from a server-owned, read-only copy checked against its manifest.

Why a copy: vLLM keeps the path a LoRA name resolved to for the server's life and reloads from it whenever the
adapter was evicted from its CPU cache (`--max-cpu-loras`). If that path were the registry folder, a version
deleted, truncated or swapped there after the first load would reach the engine on the next reload, and a
truncated safetensors file kills vLLM's engine core (EngineDeadError, the whole server exits). The copy lives
under the server's own run folder, keyed by the sha256 of the version's `manifest.json` (which must be the one
the registry recorded when the version was published: registry.local.recorded_digest_problem); every file is hashed
while it is copied and compared with the manifest before the folder is renamed into place, then made read-only.
The registry folder is never given to the engine. Only regular files are opened: a FIFO planted in the
registry would otherwise block the request that loads the version.

Per request (`check_current`), the registry folder is looked at again, cheaply: a version deleted since is
refused (404), and when a file's size, mtime or inode changed the folder is re-hashed; a mismatch is refused
(422) naming the version and `pipeline registry verify`. So what a client is answered with always matches what
the registry holds now, and what the engine loads was verified once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ground.adapter_files import version_file_path
from ground.errors import NotFoundError, RegistryError
from registry.integrity import CHUNK, MANIFEST, PAYLOAD, manifest_files, open_regular, read_regular, verify_folder
from registry.local import recorded_digest_problem

log = logging.getLogger(__name__)


class CorruptVersionError(RegistryError):
    """A version's files do not match its manifest (or its manifest changed after this server verified it)."""


class AdapterMismatchError(RegistryError):
    """A version's tensors do not fit the served base model (shapes, modules)."""


@dataclass
class _Entry:
    digest: str  # sha256 of manifest.json when first verified
    cache_dir: Path
    signature: tuple  # (name, size, mtime_ns, inode) per registry file, when last checked


def _signature(folder: Path, names) -> tuple:
    out = []
    for name in sorted(names):
        st = os.stat(folder / name)
        out.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


class VerifiedCache:
    """Verified, read-only copies of adapter versions under `root`, one folder per manifest digest."""

    def __init__(self, root: str | Path, base_dir: str | Path | None = None, enabled: bool = True):
        self.root = Path(root)
        self.base_dir = Path(base_dir) if base_dir else None
        self.enabled = enabled
        self._entries: dict[str, _Entry] = {}  # NAME@V -> entry
        self._lock = threading.Lock()
        self.seconds_spent = 0.0  # total time spent copying + hashing (the benchmark reports it)

    # ---------------------------------------------------------------------------------------- first load
    def path_for(self, ref: str, registry_dir: str | Path) -> str:
        """The folder the engine may load `ref` from: a verified copy (or the registry folder when disabled)."""
        if not self.enabled:
            return str(registry_dir)
        with self._lock:
            entry = self._entries.get(ref)
        if entry is None:
            entry = self._materialize(ref, Path(registry_dir))
        return str(entry.cache_dir)

    def _materialize(self, ref: str, folder: Path) -> _Entry:
        started = time.perf_counter()
        try:
            manifest_bytes = read_regular(folder / MANIFEST, ref)
            files = manifest_files(ref, json.loads(manifest_bytes), f"its {MANIFEST}")
        except FileNotFoundError:
            raise NotFoundError(f"`{ref}` was deleted from the registry while it was being loaded.") from None
        except RegistryError as exc:  # a FIFO, a name outside the allow-list
            raise self._corrupt(ref, str(exc).removeprefix(f"{ref}: ")) from None
        except (OSError, ValueError, KeyError, TypeError):
            raise self._corrupt(ref, f"its {MANIFEST} is unreadable") from None
        try:  # the manifest itself against the digest the registry recorded at publish (local store)
            problem = recorded_digest_problem(folder, ref, manifest_bytes)
        except RegistryError as exc:
            problem = str(exc)
        if problem:
            raise self._corrupt(ref, problem.removeprefix(f"{ref}: "))
        digest = hashlib.sha256(manifest_bytes).hexdigest()
        target = self.root / digest[:40]
        signature = None
        if not target.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            staging = self.root / f".staging-{os.getpid()}-{threading.get_ident()}-{digest[:12]}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            try:
                signature = self._copy_checked(ref, folder, files, staging)
                self._check_fits(ref, staging)
                for name in files:
                    os.chmod(staging / name, 0o444)
                try:
                    os.rename(staging, target)
                except OSError:  # another request verified the same digest first: theirs is as good as ours
                    if not target.is_dir():
                        raise
            finally:
                if staging.exists():
                    _remove_tree(staging)
        if signature is None:
            signature = _signature(folder, files)
        entry = _Entry(digest=digest, cache_dir=target, signature=signature)
        with self._lock:
            self._entries[ref] = entry
        spent = time.perf_counter() - started
        self.seconds_spent += spent
        log.info("verified %s into %s in %.1f ms", ref, target.name[:12], spent * 1000)
        return entry

    def _copy_checked(self, ref: str, folder: Path, files: dict, staging: Path) -> tuple:
        """Copy every manifest file, hashing the bytes as they are copied; returns the registry files' signature."""
        for required in PAYLOAD:
            if required not in files:
                raise self._corrupt(ref, f"its manifest does not list {required}")
        signature = []
        for name, entry in sorted(files.items()):
            h, size = hashlib.sha256(), 0
            try:
                with open_regular(version_file_path(folder, ref, name, f"its {MANIFEST}"), ref) as src, \
                        open(staging / name, "wb") as dst:
                    st = os.fstat(src.fileno())
                    while chunk := src.read(CHUNK):
                        h.update(chunk)
                        dst.write(chunk)
                        size += len(chunk)
            except FileNotFoundError:
                if not folder.is_dir():
                    raise NotFoundError(f"`{ref}` was deleted from the registry while it was being loaded.") from None
                raise self._corrupt(ref, f"{name} is missing") from None
            except CorruptVersionError:
                raise
            except RegistryError as exc:  # not a regular file (a FIFO would hang this request), a planted link
                raise self._corrupt(ref, str(exc).removeprefix(f"{ref}: ")) from None
            if h.hexdigest() != entry.get("sha256") or size != entry.get("size", size):
                raise self._corrupt(ref, f"{name} does not match its manifest (sha256 {h.hexdigest()[:16]}..., "
                                         f"{size} bytes; the manifest says {str(entry.get('sha256'))[:16]}..., "
                                         f"{entry.get('size')} bytes)")
            signature.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
        return tuple(signature)

    def _check_fits(self, ref: str, folder: Path) -> None:
        """Shapes and modules against the served base: an adapter that does not fit must never reach the engine."""
        if self.base_dir is None:
            return
        from registry.validate import validate_adapter

        try:
            validate_adapter(folder, self.base_dir)
        except RegistryError as exc:
            why = str(exc).replace(str(folder), ref)
            raise AdapterMismatchError(f"Adapter {ref} does not fit the served base model: {why}") from None

    @staticmethod
    def _corrupt(ref: str, why: str) -> CorruptVersionError:
        return CorruptVersionError(f"Adapter version {ref} is refused: {why}. Its files changed after it was "
                                   f"published; run `pipeline registry verify {ref}` and publish a new version.")

    # ---------------------------------------------------------------------------------------- every request
    def check_current(self, ref: str, registry_dir: Path | None) -> None:
        """Refuse a version that was deleted or changed in the registry since this server verified it.

        Cheap on the common path: one stat per file. Raises NotFoundError or CorruptVersionError.
        """
        if not self.enabled:
            return
        with self._lock:
            entry = self._entries.get(ref)
        if entry is None:
            return  # never loaded here: the first load verifies it
        if registry_dir is None or not (registry_dir / MANIFEST).is_file():
            raise NotFoundError(f"`{ref}` was deleted from the registry; it is no longer served. Request another "
                                "version (GET /v1/models lists them).")
        names = [name for name, *_ in entry.signature]
        try:
            if _signature(registry_dir, names) == entry.signature:
                return
            manifest_bytes = read_regular(registry_dir / MANIFEST, ref)
        except FileNotFoundError:
            raise NotFoundError(f"`{ref}` was deleted from the registry; it is no longer served.") from None
        except RegistryError as exc:
            raise self._corrupt(ref, str(exc).removeprefix(f"{ref}: ")) from None
        if hashlib.sha256(manifest_bytes).hexdigest() != entry.digest:
            raise self._corrupt(ref, "its manifest.json differs from the one this server verified (versions never "
                                     "change)")
        problems = verify_folder(ref, registry_dir)
        if problems:
            raise self._corrupt(ref, "; ".join(p.removeprefix(f"{ref}: ") for p in problems[:3]))
        with self._lock:  # touched but identical: remember the new stat so the next request is cheap again
            entry.signature = _signature(registry_dir, names)

    def clear(self) -> None:
        _remove_tree(self.root)


def _remove_tree(path: Path) -> None:
    """rmtree that first gives back the write permission the cache took away."""
    if not path.exists():
        return
    for dirpath, dirnames, filenames in os.walk(path):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            try:
                os.chmod(os.path.join(dirpath, name), 0o644)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)
