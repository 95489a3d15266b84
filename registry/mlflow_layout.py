"""Where the MLflow store keeps what (the names and tags it writes on the server), shared by its modules.

On the server (started with `mlflow server --serve-artifacts ...`):

    registered model NAME             tag pipeline.registry=lora-pipeline; its aliases are our aliases;
                                      tag pipeline.route = the route's JSON (registry/routes.py), one set-tag
                                      request per change; tags pipeline.history.<time_ns>.<random> = one history
                                      event's JSON each (registry/history.py): a new key per event, never
                                      rewritten, so concurrent writers lose none (deleting the model drops them)
    model version NAME/V              number from the server's database; tags: pipeline.format, pipeline.manifest
                                      (manifest.json's text), pipeline.metadata (metadata.json's text),
                                      pipeline.artifact_path, plus lineage.*, metric.*, base_model, rank, alpha, ...
                                      for people browsing MLflow's UI; run_id = the upload run below
    experiment lora-pipeline-registry one run per upload; its artifacts adapter/ hold the version's five files
                                      (the two PEFT files, metadata.json, manifest.json), through the artifact proxy
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlparse

from ground.errors import RegistryError
from ground.mlflow_uri import CREDENTIAL_VARS, redact_uri
from registry.integrity import MANIFEST, METADATA, PAYLOAD

SCHEMES = {"mlflow+http": "http", "mlflow+https": "https"}
EXPERIMENT = "lora-pipeline-registry"
MODEL_TAG, MODEL_TAG_VALUE = "pipeline.registry", "lora-pipeline"
FORMAT_TAG, MANIFEST_TAG, METADATA_TAG, PATH_TAG = ("pipeline.format", "pipeline.manifest", "pipeline.metadata",
                                                    "pipeline.artifact_path")
STATE_TAG, RETIRED_TAG = "pipeline.state", "pipeline.retired"
ROUTE_TAG, HISTORY_TAG_PREFIX = "pipeline.route", "pipeline.history."
TAG_VALUE_MAX = 5000
STALE_UPLOAD_S = 6 * 3600  # an upload run of another host (whose pid we cannot check) older than this is dead
CLEANUP_EVERY_S = 60.0
# Set on an upload run just before its create_model_version request. A writer killed after sending that request
# may still get its version: the server finishes a request whose client died. Cleanup leaves such an upload alone
# for this long, so that it never removes the files of a version about to appear.
CREATING_TAG = "pipeline.creating_since"
CREATE_GRACE_S = 120.0
CREATE_ATTEMPTS = 8
MLFLOW_TAG_KEY = re.compile(r"[\w\-./ ]{1,250}")
FILES = (*PAYLOAD, METADATA, MANIFEST)


def http_url(uri: str) -> str:
    """`mlflow+http://HOST:PORT[/PATH]` -> `http://HOST:PORT[/PATH]`, refusing credentials and queries in it.
    Messages show the URI through `redact_uri`: the malformed ones are where a password is typed by mistake."""
    try:
        parsed = urlparse(uri)
        host, _ = parsed.hostname, parsed.port  # both raise ValueError on a malformed host or port
    except ValueError:
        host = parsed = None
    if parsed is None or parsed.scheme not in SCHEMES or not host:
        raise RegistryError(f"Registry URI `{redact_uri(uri)}` is not an MLflow server URI; write "
                            "mlflow+http://HOST:PORT or mlflow+https://HOST[:PORT].")
    if parsed.username or parsed.password:
        raise RegistryError(f"The registry URI `{redact_uri(uri)}` holds credentials; remove them from the URI and "
                            f"set {CREDENTIAL_VARS} instead.")
    if parsed.query or parsed.fragment:
        raise RegistryError(f"Registry URI `{redact_uri(uri)}` has a query or fragment; write "
                            "mlflow+http://HOST:PORT[/PATH].")
    return f"{SCHEMES[parsed.scheme]}://{parsed.netloc}{parsed.path.rstrip('/')}"


def tags_of(entity: dict) -> dict[str, str]:
    return {t["key"]: t.get("value", "") for t in entity.get("tags", [])}


def browse_tags(metadata: dict) -> dict[str, str]:
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

