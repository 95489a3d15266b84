"""The registry on an MLflow tracking server (`mlflow+http://HOST:PORT`, `mlflow+https://...`).

Where things live on the server: registry/mlflow_layout.py. Publishing (registry/mlflow_publish.py) makes a version
visible in the single database transaction that numbers it, after all of its files are uploaded and verified;
killed uploads are removed by registry/mlflow_leftovers.py.

Reading: metadata comes from the version's tags (checked against the manifest's sha256), files from the verified
local cache (registry/cache.py), downloaded once per machine. Aliases are MLflow aliases; each move is one atomic
request. What MLflow cannot give: a lock across machines. Check-then-act steps (delete refusing an aliased
version, alias set checking the version exists) are serialized within a process only; across machines a
concurrent alias move and delete can interleave (MLflow then drops the alias of the deleted version).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import shutil
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

from ground.errors import NotFoundError, RegistryError
from registry.cache import VersionCache, cache_max_bytes, cache_root
from registry.integrity import MANIFEST, METADATA, PAYLOAD, manifest_files, verify_folder
from registry.mlflow_http import ApiError, MlflowServer
from registry.mlflow_layout import (FORMAT_TAG, HISTORY_TAG_PREFIX, MANIFEST_TAG, METADATA_TAG, MODEL_TAG,
                                    MODEL_TAG_VALUE, PATH_TAG, ROUTE_TAG, TAG_VALUE_MAX, http_url, tags_of as _tags)
from registry.mlflow_leftovers import MlflowLeftovers
from registry.mlflow_publish import MANIFEST_DIGEST_PARAM, MlflowPublishing
from registry.store import Store

log = logging.getLogger(__name__)


class MlflowStore(MlflowPublishing, MlflowLeftovers, Store):
    """Reading, aliases and deleting here; publishing in MlflowPublishing, leftovers in MlflowLeftovers."""

    def __init__(self, uri: str, cache_dir=None, cache_bytes: int | None = None):
        self.server = MlflowServer(http_url(uri))
        self.uri = uri.rstrip("/")
        self.cache = VersionCache(cache_root(cache_dir), self.server.base_url, cache_max_bytes(cache_bytes))
        self._locks: dict[str, threading.RLock] = defaultdict(threading.RLock)
        self._experiment_id: str | None = None
        self._last_cleanup = 0.0

    # ------------------------------------------------------------------------------------------- reading
    @staticmethod
    def _ours(mv: dict) -> bool:
        return mv.get("status", "READY") == "READY" and FORMAT_TAG in _tags(mv)

    def _search(self, name: str, **params) -> list[dict]:
        return self.server.search("model-versions/search", "model_versions", f"listing versions of {name}",
                                  filter=f"name='{name}'", **params)

    def list_adapters(self) -> list[str]:
        models = self.server.search("registered-models/search", "registered_models", "listing adapters",
                                    max_results=1000)
        return sorted(m["name"] for m in models
                      if _tags(m).get(MODEL_TAG) == MODEL_TAG_VALUE and m.get("latest_versions"))

    def version_numbers(self, name: str) -> list[int]:
        return sorted(int(mv["version"]) for mv in self._search(name, max_results=10000) if self._ours(mv))

    def latest_version(self, name: str) -> int | None:
        top = self.server.get("model-versions/search", f"finding the latest version of {name}",
                              filter=f"name='{name}'", max_results=20,
                              order_by="version_number DESC").get("model_versions", [])
        for mv in top:
            if self._ours(mv):
                return int(mv["version"])
        return max(self.version_numbers(name), default=None) if len(top) == 20 else None

    def _model_version(self, name: str, version: int) -> dict | None:
        try:
            mv = self.server.get("model-versions/get", f"reading {name}@{version}", name=name,
                                 version=str(int(version)))["model_version"]
        except NotFoundError:
            return None
        return mv if self._ours(mv) else None

    def _metadata(self, mv: dict) -> dict:
        tags = _tags(mv)
        ref = f"{mv['name']}@{mv['version']}"
        files = manifest_files(ref, json.loads(tags[MANIFEST_TAG]), f"the {MANIFEST_TAG} tag of {ref} on {self.uri}")
        if not isinstance(files.get(METADATA), dict):
            raise RegistryError(f"{ref} on {self.uri}: its manifest does not list {METADATA}; run "
                                f"`pipeline registry verify {ref}`, then delete it and publish it again.")
        text = tags.get(METADATA_TAG)
        if text is None:  # too long for a tag: read the file (downloads the version once)
            text = (self._folder(mv) / METADATA).read_text()
        if hashlib.sha256(text.encode()).hexdigest() != files[METADATA].get("sha256"):
            raise RegistryError(f"{mv['name']}@{mv['version']} on {self.uri}: its metadata does not match its "
                                f"manifest; run `pipeline registry verify {mv['name']}@{mv['version']}`.")
        return json.loads(text)

    def _folder(self, mv: dict) -> Path:
        tags = _tags(mv)
        manifest_text = tags[MANIFEST_TAG]
        art = tags[PATH_TAG]

        def download(fname: str, dst: Path) -> str:
            return self.server.download(f"{art}/{fname}", dst)

        name, version, manifest = mv["name"], int(mv["version"]), json.loads(manifest_text)
        folder = self.cache.get(name, version, mv["run_id"], manifest)
        if folder is None:  # about to download: first the tag against what the upload recorded
            problem = self._recorded_manifest_problem(mv, manifest_text)
            if problem:
                raise RegistryError(f"{problem}. It is not served or exported; delete it and publish it again.")
            folder = self.cache.fill(name, version, mv["run_id"], manifest, download)
        if not (folder / MANIFEST).is_file():
            (folder / MANIFEST).write_text(manifest_text)  # the tag is manifest.json's exact text
        return folder

    def _recorded_manifest_problem(self, mv: dict, manifest_text: str) -> str | None:
        """Whether the `pipeline.manifest` tag (rewritable by anyone with write access) is still the manifest the
        upload run recorded as an immutable parameter at publish; None when it is, or for versions published
        before that parameter existed."""
        ref = f"{mv['name']}@{mv['version']}"
        run = self.server.get("runs/get", f"reading the upload of {ref}", run_id=mv["run_id"])["run"]
        recorded = {p["key"]: p["value"] for p in run.get("data", {}).get("params", [])}.get(MANIFEST_DIGEST_PARAM)
        digest = hashlib.sha256(manifest_text.encode()).hexdigest()
        if recorded is None or recorded == digest:
            return None
        return (f"{ref} on {self.uri}: its {MANIFEST_TAG} tag (sha256 {digest[:16]}...) is not the manifest recorded "
                f"when it was published ({recorded[:16]}..., parameter {MANIFEST_DIGEST_PARAM} of upload run "
                f"{mv['run_id']}); the tag was rewritten after publishing")

    def open_version(self, name: str, version: int):
        mv = self._model_version(name, version)
        if mv is None:
            return None
        return self._metadata(mv), lambda: self._folder(mv)

    def list_versions(self, name: str) -> list[tuple[int, dict, Callable[[], Path]]]:
        """Every version with its metadata from one search (no download)."""
        out = []
        for mv in self._search(name, max_results=10000):
            if self._ours(mv):
                out.append((int(mv["version"]), self._metadata(mv), lambda mv=mv: self._folder(mv)))
        return sorted(out, key=lambda item: item[0])

    def version_dir(self, name: str, version: int) -> Path | None:
        mv = self._model_version(name, version)
        return self._folder(mv) if mv is not None else None

    def read_aliases(self, name: str) -> dict[str, int]:
        try:
            model = self.server.get("registered-models/get", f"reading the aliases of {name}", name=name)
        except NotFoundError:
            return {}
        return {a["alias"]: int(a["version"]) for a in model["registered_model"].get("aliases", [])}

    def resolve_alias(self, name: str, alias: str) -> int | None:
        """One small request: reading the registered model instead loads all of its versions on the server
        (the benchmark measured a p99 of 200 ms that way for NAME@prod at 1,000 versions)."""
        try:
            mv = self.server.get("registered-models/alias", f"resolving {name}@{alias}", name=name, alias=alias)
        except NotFoundError:
            return None
        except ApiError as exc:  # MLflow 3 answers an unknown alias with INVALID_PARAMETER_VALUE "... not found"
            if exc.code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc):
                return None
            raise
        return int(mv["model_version"]["version"])

    def verify_version(self, ref: str, name: str, version: int) -> list[str]:
        """Download the server's copy afresh and re-hash it; also re-hash this machine's cached copy."""
        mv = self._model_version(name, version)
        if mv is None:
            return [f"{ref} does not exist"]
        tags = _tags(mv)
        manifest, art = json.loads(tags[MANIFEST_TAG]), tags[PATH_TAG]
        try:  # names from a tag: checked before any is joined to a path
            files = manifest_files(ref, manifest, f"the {MANIFEST_TAG} tag of {ref} on {self.uri}")
        except RegistryError as exc:
            return [str(exc)]
        problem = self._recorded_manifest_problem(mv, tags[MANIFEST_TAG])
        problems, tmp = ([problem] if problem else []), self.cache.tmp_folder()
        try:
            for fname, entry in sorted(files.items()):
                try:
                    got = self.server.download(f"{art}/{fname}", tmp / fname)
                except NotFoundError:
                    problems.append(f"{ref}: {fname} is missing on the server")
                    continue
                if got != entry["sha256"]:
                    problems.append(f"{ref}: {fname} is corrupted on the server (sha256 {got[:16]}..., manifest "
                                    f"says {entry['sha256'][:16]}...)")
            for required in (*PAYLOAD, METADATA):
                if required not in manifest["files"]:
                    problems.append(f"{ref}: the manifest does not list {required}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        cached = self.cache.folder(name, version, mv["run_id"])
        if cached.is_dir():
            bad = verify_folder(f"{ref} (cached copy in {cached})", cached)
            if bad:
                problems += bad
                self.cache.discard(cached)  # downloaded again on next use
        return problems

    # ------------------------------------------------------------------------------------------- aliases, deleting
    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        with self._locks[name]:  # within this process only: see the module docstring
            yield

    def update_aliases(self, name: str, change) -> dict[str, int]:
        with self.locked(name):
            old = self.read_aliases(name)
            new = change(dict(old))
            for alias, version in sorted(new.items()):
                if old.get(alias) != version:
                    self.server.post("registered-models/alias", f"pointing {name}@{alias} at {version}",
                                     {"name": name, "alias": alias, "version": str(version)}, idempotent=True)
            for alias in sorted(set(old) - set(new)):
                self.server.delete("registered-models/alias", f"deleting alias {name}@{alias}",
                                   {"name": name, "alias": alias})
            return new

    # ------------------------------------------------------------------------------------------- routes, history
    def _model_tags(self, name: str, what: str) -> dict[str, str]:
        """The registered model's tags. A search by exact name, not registered-models/get: the server answers a
        search with the latest version from one SQL query, while `get` loads every version of the model (the
        route is read about once a second per server)."""
        found = self.server.get("registered-models/search", what, filter=f"name='{name}'",
                                max_results=1).get("registered_models", [])
        return _tags(found[0]) if found and found[0].get("name") == name else {}

    def read_route(self, name: str) -> dict | None:
        text = self._model_tags(name, f"reading the route of {name}").get(ROUTE_TAG)
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            raise RegistryError(f"The {ROUTE_TAG} tag of `{name}` on {self.uri} is not JSON; set the route again "
                                f"(`pipeline registry route set {name} ...`).") from None

    def write_route(self, name: str, record: dict) -> None:
        self.server.post("registered-models/set-tag", f"setting the route of {name}",
                         {"name": name, "key": ROUTE_TAG, "value": json.dumps(record)}, idempotent=True)

    def append_event(self, name: str, event_json: str) -> None:
        if len(event_json) > TAG_VALUE_MAX:  # figures too large for one tag: keep the event, say what was cut
            event = json.loads(event_json)
            event["figures"] = {"truncated": f"{len(json.dumps(event['figures']))} characters of figures did not fit"}
            event_json = json.dumps(event, separators=(",", ":"))
        # a key of its own per event (time first, so keys sort in time order): no writer ever overwrites another
        key = f"{HISTORY_TAG_PREFIX}{time.time_ns():020d}.{secrets.token_hex(4)}"
        self.server.post("registered-models/set-tag", f"recording an event of {name}",
                         {"name": name, "key": key, "value": event_json}, idempotent=True)

    def read_events(self, name: str) -> list[dict]:
        tags = self._model_tags(name, f"reading the history of {name}")
        events = []
        for key in sorted(k for k in tags if k.startswith(HISTORY_TAG_PREFIX)):
            try:
                events.append(json.loads(tags[key]))
            except ValueError:
                log.warning("history tag %s of %s on %s is not JSON; skipped", key, name, self.uri)
        return events

    def _delete_version(self, name: str, version: int) -> None:
        mv = self._model_version(name, version)
        self.server.delete("model-versions/delete", f"deleting {name}@{version}", {"name": name, "version": str(version)})
        if mv is None:
            return
        try:  # the files go too; the number stays retired in MLflow's database
            self.server.delete_artifacts(_tags(mv)[PATH_TAG])
            self.server.post("runs/delete", f"deleting the upload of {name}@{version}", {"run_id": mv["run_id"]})
        except RegistryError as exc:
            log.warning("%s@%d is deleted, but its files stay on the server: %s", name, version, exc)
        self.cache.discard(self.cache.folder(name, version, mv["run_id"]))

    def remove_version(self, name: str, version: int, check) -> None:
        with self.locked(name):
            if self._model_version(name, version) is None:
                raise NotFoundError(f"{name}@{version} does not exist on {self.uri}.")
            old = self.read_aliases(name)
            new = check(dict(old))
            if new != old:
                self.update_aliases(name, lambda _: new)
            self._delete_version(name, version)
