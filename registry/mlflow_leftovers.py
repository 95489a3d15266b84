"""What killed or cut-off publishers leave on the MLflow store, found and removed (`pipeline registry cleanup`,
and at most once a minute the next publish): the leftover half of registry/mlflow_store.py's MlflowStore."""

from __future__ import annotations

import os
import time
from urllib.parse import urlparse

from ground.errors import NotFoundError
from ground.processes import pid_alive
from registry.local import HOST
from registry.mlflow_layout import (CREATE_GRACE_S, CREATING_TAG, EXPERIMENT, RETIRED_TAG, STALE_UPLOAD_S, STATE_TAG,
                                    tags_of)


class MlflowLeftovers:
    """Mixed into MlflowStore: uses its `server`, `cache` and `_finish_upload`."""

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
            info, tags = run["info"], tags_of(run.get("data", {}))
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
            creating_s = now_ms / 1000 - float(tags.get(CREATING_TAG) or "-inf")
            if dead and creating_s < CREATE_GRACE_S and age_s <= limit:
                # its create_model_version may still be running on the server: removing the files now could
                # leave a version without them
                lines.append(f"upload {info['run_id']} of {name}: writer gone, {creating_s:.0f} s after it asked for "
                             f"its version; left for a cleanup once {CREATE_GRACE_S:.0f} s have passed")
                continue
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
