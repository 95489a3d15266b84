"""Publishing to the MLflow store (`commit`) and consuming numbers (`retire_numbers`): the upload side of
registry/mlflow_store.py's MlflowStore, kept apart because it is the half with the failure handling.

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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from ground.errors import NotFoundError, RegistryError
from registry.integrity import MANIFEST, METADATA
from registry.local import HOST
from registry.mlflow_http import ApiError, ServerUnavailableError
from registry.mlflow_layout import (CLEANUP_EVERY_S, CREATE_ATTEMPTS, CREATING_TAG, EXPERIMENT, FILES, FORMAT_TAG, MANIFEST_TAG,
                                    METADATA_TAG, MODEL_TAG, MODEL_TAG_VALUE, PATH_TAG, RETIRED_TAG, STATE_TAG,
                                    TAG_VALUE_MAX, browse_tags)

log = logging.getLogger(__name__)

# The upload run's parameter holding sha256(manifest text). MLflow refuses to change a logged parameter, while
# anyone with write access can rewrite a model version's tags: readers compare the `pipeline.manifest` tag with it.
MANIFEST_DIGEST_PARAM = "pipeline.manifest_sha256"


class MlflowPublishing:
    """Mixed into MlflowStore: uses its `server`, `cache`, `uri`, `latest_version`, `_delete_version`, `cleanup`."""

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
        self.server.post("runs/log-parameter", f"recording the manifest of {name}", {
            "run_id": run_id, "key": MANIFEST_DIGEST_PARAM,
            "value": hashlib.sha256(manifest_text.encode()).hexdigest()}, idempotent=True)
        tags = {**browse_tags(metadata), FORMAT_TAG: "1", MANIFEST_TAG: manifest_text, PATH_TAG: art}
        if len(metadata_text) <= TAG_VALUE_MAX:
            tags[METADATA_TAG] = metadata_text
        self.server.post("runs/set-tag", f"publishing {name}", {"run_id": run_id, "key": CREATING_TAG,
                                                                 "value": f"{time.time():.3f}"}, idempotent=True)
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

