"""Versioned adapter registry: adapters, immutable adapter versions, aliases, lineage and integrity.

    from registry import open_registry
    reg = open_registry()                      # --registry / registry.uri > $PIPELINE_REGISTRY > ./registry-store
    v = reg.publish("out/adapter", "arithmetic-grpo", base_dir="models/base", alias="prod",
                    lineage={"run_id": "...", "algorithm": "grpo"})
    reg.resolve("arithmetic-grpo@prod").path   # a folder PEFT and vLLM load as is
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from ground.errors import RegistryError
from ground.mlflow_uri import redact_uri
from registry.core import DEFAULT_URI, AdapterVersion, Registry
from registry.integrity import VerifyReport
from registry.refs import parse_ref
from registry.store import Store

__all__ = ["open_registry", "resolve_uri", "Registry", "AdapterVersion", "VerifyReport", "Store", "parse_ref"]


def resolve_uri(uri: str | None = None) -> str:
    """The registry location: the explicit `uri` (--registry or registry.uri) > $PIPELINE_REGISTRY > default."""
    return uri or os.environ.get("PIPELINE_REGISTRY") or DEFAULT_URI


def open_registry(uri: str | None = None, *, mlflow_tracking_uri: str | None = None,
                  mirror_mlflow: bool | None = None, cache_dir=None, cache_bytes: int | None = None) -> Registry:
    """Open (lazily create) the registry at `uri` (see resolve_uri).

    A `file://` URI or a path is a local store; `mlflow+http://HOST:PORT` or `mlflow+https://HOST[:PORT]` is an
    MLflow tracking server (registry/mlflow_store.py), read through a verified local cache (`cache_dir`, default
    $PIPELINE_REGISTRY_CACHE or ~/.cache/lora-pipeline/registry; `cache_bytes`, default
    $PIPELINE_REGISTRY_CACHE_MAX_GB or 20 GB).

    MLflow mirroring (of a local store) is on when `mlflow_tracking_uri` is given (e.g. from
    trainer.mlflow_tracking_uri) or $MLFLOW_TRACKING_URI is set; `mirror_mlflow=False` turns it off.
    """
    from registry.local import LocalStore

    location = resolve_uri(uri)
    shown = redact_uri(location)  # what messages show: never a user-info or query, where secrets hide
    try:
        parsed = urlparse(location)
    except ValueError:  # e.g. an unbalanced '[' in the host
        raise RegistryError(f"Registry URI `{shown}` is not a valid URI; use a local folder, file:///path, or an "
                            "MLflow server: mlflow+http://HOST:PORT.") from None
    if parsed.scheme in ("mlflow+http", "mlflow+https"):
        from registry.mlflow_store import MlflowStore

        return Registry(MlflowStore(location, cache_dir=cache_dir, cache_bytes=cache_bytes))  # no mirror of itself
    if parsed.scheme.startswith("mlflow") or parsed.scheme in ("http", "https"):
        raise RegistryError(f"Registry URI `{shown}`: an MLflow tracking server is written mlflow+http://HOST:PORT "
                            "or mlflow+https://HOST[:PORT] (the server started with --serve-artifacts).")
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise RegistryError(f"Registry URI `{shown}` names host `{parsed.netloc.rpartition('@')[2]}`; file URIs "
                                "must be local (file:///abs/path).")
        store = LocalStore(Path(unquote(parsed.path)))
    elif parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive, i.e. a path
        raise RegistryError(f"Registry URI `{shown}` uses scheme `{parsed.scheme}://`, which has no backend; use "
                            "a local folder, file:///path, or an MLflow server: mlflow+http://HOST:PORT.")
    else:
        store = LocalStore(Path(location))

    mirror = None
    tracking = mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking and mirror_mlflow is not False:
        from registry.mlflow_mirror import MlflowMirror

        mirror = MlflowMirror(tracking)
    return Registry(store, mirror)
