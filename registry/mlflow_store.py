"""The registry on an MLflow tracking server (`mlflow+http://HOST:PORT`, `mlflow+https://...`).

What lives where on the server (started with `mlflow server --serve-artifacts ...`):

    registered model NAME             tag pipeline.registry=lora-pipeline; its aliases are our aliases
    model version NAME/V              number from the server's database; tags: pipeline.format, pipeline.manifest
                                      (manifest.json's text), pipeline.metadata (metadata.json's text),
                                      pipeline.artifact_path, plus lineage.*, metric.*, base_model, rank, alpha, ...
                                      for people browsing MLflow's UI; run_id = the upload run below
    experiment lora-pipeline-registry one run per upload; its artifacts adapter/ hold the version's five files
                                      (the two PEFT files, metadata.json, manifest.json), through the artifact proxy

Publishing (`commit`): create an upload run tagged pipeline.state=staging -> upload the five files -> download
them again and check every sha256 against the manifest -> `create_model_version` with all tags in ONE request ->
mark the run finished. The version becomes visible in the single database transaction that numbers it, so:
- numbers never repeat (the database numbers them) and never skip: nothing can fail between taking a number and
  becoming visible, and a publisher killed or cut off before that request took no number;
- no version is ever visible without all of its files uploaded and verified;
- the price: metadata.json stored on the server cannot hold the version number (it is written before the number
  exists) and says `"version": null`; the number is MLflow's, and readers fill it in (`AdapterVersion`).
A lost answer to `create_model_version` is resolved by looking the version up by its run id before retrying, so
a retry never creates a second version. Killed uploads leave a staging run, removed by `cleanup` (run by
`pipeline registry cleanup` and, at most once a minute, by the next publish).

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
import os
import re
import shutil
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlparse

from ground.errors import NotFoundError, RegistryError
from ground.processes import pid_alive
from registry.cache import VersionCache, cache_max_bytes, cache_root
from registry.integrity import MANIFEST, METADATA, PAYLOAD, verify_folder
from registry.local import HOST
from registry.mlflow_http import ApiError, MlflowServer, ServerUnavailableError
from registry.store import Store

log = logging.getLogger(__name__)

SCHEMES = {"mlflow+http": "http", "mlflow+https": "https"}
EXPERIMENT = "lora-pipeline-registry"
MODEL_TAG, MODEL_TAG_VALUE = "pipeline.registry", "lora-pipeline"
FORMAT_TAG, MANIFEST_TAG, METADATA_TAG, PATH_TAG = ("pipeline.format", "pipeline.manifest", "pipeline.metadata",
                                                    "pipeline.artifact_path")
STATE_TAG, RETIRED_TAG = "pipeline.state", "pipeline.retired"
TAG_VALUE_MAX = 5000
STALE_UPLOAD_S = 6 * 3600  # an upload run of another host (whose pid we cannot check) older than this is dead
CLEANUP_EVERY_S = 60.0
CREATE_ATTEMPTS = 8
MLFLOW_TAG_KEY = re.compile(r"[\w\-./ ]{1,250}")
FILES = (*PAYLOAD, METADATA, MANIFEST)


def http_url(uri: str) -> str:
    """`mlflow+http://HOST:PORT[/PATH]` -> `http://HOST:PORT[/PATH]`, refusing credentials and queries in it."""
    parsed = urlparse(uri)
    if parsed.scheme not in SCHEMES or not parsed.hostname:
        raise RegistryError(f"Registry URI `{uri}` is not an MLflow server URI; write mlflow+http://HOST:PORT or "
                            "mlflow+https://HOST[:PORT].")
    if parsed.username or parsed.password:
        raise RegistryError("The registry URI holds credentials; remove them from the URI and set "
                            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead.")
    if parsed.query or parsed.fragment:
        raise RegistryError(f"Registry URI `{uri}` has a query or fragment; write mlflow+http://HOST:PORT[/PATH].")
    return f"{SCHEMES[parsed.scheme]}://{parsed.netloc}{parsed.path.rstrip('/')}"


def _tags(entity: dict) -> dict[str, str]:
    return {t["key"]: t.get("value", "") for t in entity.get("tags", [])}


def _browse_tags(metadata: dict) -> dict[str, str]:
    """Tags for people browsing MLflow: lineage, metrics, base, rank/alpha, the user's tags (where MLflow takes
    the key). Informational: metadata.json (tag pipeline.metadata) is the record."""
    tags = {str(k): str(v) for k, v in metadata.get("tags", {}).items()}
    tags.update({f"lineage.{k}": json.dumps(v) if isinstance(v, (dict, list)) else str(v)
                 for k, v in metadata.get("lineage", {}).items() if v is not None})
    tags.update({f"metric.{k}": str(v) for k, v in metadata.get("metrics", {}).items()})
    for key in ("base_model", "base_fingerprint", "rank", "alpha", "parent_version"):
        if metadata.get(key) is not None:
            tags[key] = str(metadata[key])
    return {k: v for k, v in tags.items() if MLFLOW_TAG_KEY.fullmatch(k) and not k.startswith("pipeline.")
            and len(v) <= TAG_VALUE_MAX}


class MlflowStore(Store):
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
        manifest = json.loads(tags[MANIFEST_TAG])
        text = tags.get(METADATA_TAG)
        if text is None:  # too long for a tag: read the file (downloads the version once)
            text = (self._folder(mv) / METADATA).read_text()
        if hashlib.sha256(text.encode()).hexdigest() != manifest["files"][METADATA]["sha256"]:
            raise RegistryError(f"{mv['name']}@{mv['version']} on {self.uri}: its metadata does not match its "
                                f"manifest; run `pipeline registry verify {mv['name']}@{mv['version']}`.")
        return json.loads(text)

    def _folder(self, mv: dict) -> Path:
        tags = _tags(mv)
        manifest_text = tags[MANIFEST_TAG]
        art = tags[PATH_TAG]

        def download(fname: str, dst: Path) -> str:
            return self.server.download(f"{art}/{fname}", dst)

        folder = self.cache.fill(mv["name"], int(mv["version"]), mv["run_id"], json.loads(manifest_text), download)
        if not (folder / MANIFEST).is_file():
            (folder / MANIFEST).write_text(manifest_text)  # the tag is manifest.json's exact text
        return folder

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
        problems, tmp = [], self.cache.tmp_folder()
        try:
            for fname, entry in sorted(manifest["files"].items()):
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

    # ------------------------------------------------------------------------------------------- writing
    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        with self._locks[name]:  # within this process only: see the module docstring
            yield

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        if time.monotonic() - self._last_cleanup > CLEANUP_EVERY_S:
            self._last_cleanup = time.monotonic()
            try:
                for line in self.cleanup():
                    log.info("registry cleanup: %s", line)
            except RegistryError as exc:  # the publish itself reports a real problem with the server
                log.debug("cleanup before publish skipped: %s", exc)
        path = self.cache.tmp_folder()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def _experiment(self) -> str:
        if self._experiment_id is None:
            try:
                exp = self.server.get("experiments/get-by-name", "finding the registry's experiment",
                                      experiment_name=EXPERIMENT)["experiment"]
                self._experiment_id = exp["experiment_id"]
            except NotFoundError:
                try:
                    self._experiment_id = self.server.post("experiments/create", "creating the registry's experiment",
                                                           {"name": EXPERIMENT})["experiment_id"]
                except (ApiError, ServerUnavailableError):  # created by another publisher at the same moment?
                    exp = self.server.get("experiments/get-by-name", "finding the registry's experiment",
                                          experiment_name=EXPERIMENT)["experiment"]
                    self._experiment_id = exp["experiment_id"]
        return self._experiment_id

    def _ensure_model(self, name: str) -> None:
        try:
            self.server.post("registered-models/create", f"creating adapter {name}",
                             {"name": name, "tags": [{"key": MODEL_TAG, "value": MODEL_TAG_VALUE}],
                              "description": "LoRA adapter in the lora-pipeline registry."})
        except ApiError as exc:
            if exc.code != "RESOURCE_ALREADY_EXISTS":
                raise
        except ServerUnavailableError:  # e.g. a database conflict with another publisher creating it
            self.server.get("registered-models/get", f"reading adapter {name}", name=name)

    def _start_upload(self, name: str) -> tuple[str, str]:
        """A staging run for one upload; returns (run id, artifact path of its adapter/ folder on the proxy)."""
        tags = {STATE_TAG: "staging", "pipeline.adapter": name, "pipeline.host": HOST, "pipeline.pid": str(os.getpid())}
        run = self.server.post("runs/create", f"starting an upload of {name}", {
            "experiment_id": self._experiment(), "start_time": int(time.time() * 1000), "run_name": f"upload-{name}",
            "tags": [{"key": k, "value": v} for k, v in tags.items()]},
            idempotent=True)["run"]["info"]  # a repeat leaves one more staging run, which cleanup removes
        uri = urlparse(run["artifact_uri"])
        if uri.scheme != "mlflow-artifacts":
            raise RegistryError(f"MLflow server {self.server.base_url} stores artifacts at `{run['artifact_uri']}`, "
                                "which clients cannot reach; start it with `mlflow server --serve-artifacts "
                                "--artifacts-destination DIR ...` so files go through its artifact proxy.")
        return run["run_id"], f"{uri.path.strip('/')}/adapter"

    def _upload_verified(self, staged: Path, art: str, name: str) -> None:
        """Upload the five files, then download each again and compare sha256 with the local file's."""
        for fname in FILES:
            self.server.upload(staged / fname, f"{art}/{fname}")
        check = self.cache.tmp_folder()
        try:
            for fname in FILES:
                local = hashlib.sha256((staged / fname).read_bytes()).hexdigest()
                if self.server.download(f"{art}/{fname}", check / fname) != local:
                    raise RegistryError(f"MLflow server {self.server.base_url} returned a different {fname} than "
                                        f"was uploaded for {name}; nothing was published. Retry; if it persists, "
                                        "check the server's artifact storage.")
        finally:
            shutil.rmtree(check, ignore_errors=True)

    def _create_version(self, name: str, run_id: str, art: str, tags: dict[str, str], description: str) -> int:
        """create_model_version, never twice: after an error the version is looked up by run id before retrying."""
        body = {"name": name, "source": f"mlflow-artifacts:/{art}", "run_id": run_id, "description": description,
                "tags": [{"key": k, "value": v} for k, v in tags.items()]}
        for attempt in range(CREATE_ATTEMPTS):
            try:
                return int(self.server.post("model-versions/create", f"publishing {name}", body)["model_version"]["version"])
            except ServerUnavailableError:
                # 5xx (sqlite busy, MLflow's own retries exhausted under contention) or no answer: did it happen?
                done = self.server.search("model-versions/search", "model_versions", f"checking {name}",
                                          filter=f"name='{name}' and run_id='{run_id}'")
                if done:
                    return int(done[0]["version"])
                if attempt == CREATE_ATTEMPTS - 1:
                    raise
                time.sleep(min(2.0, 0.05 * 2 ** attempt))
        raise AssertionError("unreachable")

    def commit(self, name: str, staged: Path, finish, after=None, expect_version: int | None = None) -> int:
        finish(staged, None)  # the number does not exist yet: see the module docstring
        manifest_text = (staged / MANIFEST).read_text()
        metadata_text = (staged / METADATA).read_text()
        metadata = json.loads(metadata_text)
        self._ensure_model(name)
        if expect_version is not None and (self.latest_version(name) or 0) >= expect_version:
            raise RegistryError(f"{self.uri}: `{name}` already has versions up to {self.latest_version(name)}; "
                                f"cannot add version {expect_version} with its number.")
        run_id, art = self._start_upload(name)
        self._upload_verified(staged, art, name)
        tags = {**_browse_tags(metadata), FORMAT_TAG: "1", MANIFEST_TAG: manifest_text, PATH_TAG: art}
        if len(metadata_text) <= TAG_VALUE_MAX:
            tags[METADATA_TAG] = metadata_text
        version = self._create_version(name, run_id, art, tags, str(metadata.get("tags", {}).get("description", "")))
        try:
            self._finish_upload(run_id, version)
        except RegistryError as exc:  # the version is published; cleanup marks the run finished later
            log.warning("%s@%d is published; marking its upload run finished failed (%s)", name, version, exc)
        self.cache.adopt(name, version, run_id, staged, json.loads(manifest_text))
        if expect_version is not None and version != expect_version:
            self._delete_version(name, version)
            raise RegistryError(f"{self.uri}: the copy of {name}@{expect_version} got number {version} (another "
                                "writer, or numbers retired there earlier); it was removed again.")
        if after is not None:
            after(version)
        return version

    def _finish_upload(self, run_id: str, version: int | None) -> None:
        self.server.post("runs/update", "finishing an upload", {"run_id": run_id, "status": "FINISHED",
                                                                 "end_time": int(time.time() * 1000)}, idempotent=True)
        self.server.post("runs/set-tag", "finishing an upload", {"run_id": run_id, "key": STATE_TAG,
                                                                  "value": "published" if version else "removed"},
                         idempotent=True)

    def retire_numbers(self, name: str, upto: int) -> None:
        """Consume numbers up to `upto` with placeholder versions deleted at once (MLflow never reuses a number)."""
        self._ensure_model(name)
        while (self.latest_version(name) or 0) < upto:
            mv = self.server.post("model-versions/create", f"retiring a number of {name}", {
                "name": name, "source": f"lora-pipeline:/retired-numbers/{name}",
                "tags": [{"key": RETIRED_TAG, "value": "1"}]})
            number = int(mv["model_version"]["version"])
            self.server.delete("model-versions/delete", f"retiring {name}@{number}", {"name": name, "version": str(number)})
            if number >= upto:
                return

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

    # ------------------------------------------------------------------------------------------- leftovers
    def cleanup(self, max_age_s: float | None = None) -> list[str]:
        """Finish uploads whose version exists; remove uploads that never became a version and whose writer is
        gone (same host, pid dead) or that are older than `max_age_s` (default 6 h); remove retired-number
        placeholders a killed copy left visible; remove dead downloads from this machine's cache."""
        lines = []
        try:
            exp = self.server.get("experiments/get-by-name", "finding the registry's experiment",
                                  experiment_name=EXPERIMENT)["experiment"]["experiment_id"]
        except NotFoundError:
            exp = None
        limit = STALE_UPLOAD_S if max_age_s is None else max_age_s
        now_ms = time.time() * 1000
        runs = []
        if exp is not None:
            token = None
            while True:
                page = self.server.post("runs/search", "listing unfinished uploads", {
                    "experiment_ids": [exp], "filter": f"tags.`{STATE_TAG}` = 'staging'", "max_results": 1000,
                    **({"page_token": token} if token else {})}, idempotent=True)
                runs += page.get("runs", [])
                token = page.get("next_page_token")
                if not token:
                    break
        for run in runs:
            info, tags = run["info"], _tags(run.get("data", {}))
            name = tags.get("pipeline.adapter", "?")
            done = self.server.search("model-versions/search", "model_versions", "checking an upload",
                                      filter=f"run_id='{info['run_id']}'")
            if done:
                self._finish_upload(info["run_id"], int(done[0]["version"]))
                lines.append(f"upload {info['run_id']} of {name}: version {done[0]['version']} exists; marked finished")
                continue
            pid = tags.get("pipeline.pid", "")
            dead = tags.get("pipeline.host") == HOST and pid.isdigit() and int(pid) != os.getpid() \
                and not pid_alive(int(pid))
            age_s = (now_ms - int(info.get("start_time") or now_ms)) / 1000
            if dead or age_s > limit:
                path = urlparse(info["artifact_uri"]).path.strip("/")
                try:
                    self.server.delete_artifacts(path)
                except NotFoundError:
                    pass
                self.server.post("runs/delete", "removing a dead upload", {"run_id": info["run_id"]}, idempotent=True)
                lines.append(f"upload {info['run_id']} of {name} ({age_s:.0f} s old, writer "
                             f"{'gone' if dead else 'too old'}): never became a version; files removed")
        for mv in self.server.search("model-versions/search", "model_versions", "listing retired numbers",
                                     filter=f"tags.`{RETIRED_TAG}` = '1'"):
            self.server.delete("model-versions/delete", "removing a placeholder",
                               {"name": mv["name"], "version": mv["version"]})
            lines.append(f"placeholder {mv['name']}@{mv['version']} of a retired number: removed")
        lines += [f"dead download in the local cache: {p}" for p in self.cache.cleanup()]
        return lines
