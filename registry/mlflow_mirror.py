"""Mirror of the registry in MLflow's Model Registry: same name, same version numbers, tags, run link, aliases.

MLflow numbers model versions itself (max + 1, never reusing a deleted number). The registry calls `sync`
while it still holds the adapter's publish lock, so versions are registered in the registry's order and the
numbers agree. `sync` also catches up: a version published while MLflow was unreachable (or by a publisher
killed between its rename and its mirror call) is registered on the next publish, before the new one. The
registered model's tag `pipeline.mirrored_upto` remembers how far the mirror got, because a deleted version
disappears from MLflow's searches but keeps its number.

The local registry stays the system of record: a failing MLflow logs a warning and never fails a publish.
"""

from __future__ import annotations

import logging
from functools import cached_property

from ground.mlflow_uri import redact_uri

log = logging.getLogger(__name__)

MIRRORED_UPTO = "pipeline.mirrored_upto"


def version_tags(av) -> dict[str, str]:
    """MLflow tags for one adapter version: the user's tags, lineage, base, rank/alpha, metrics, registry ref."""
    md = av.metadata
    tags = {str(k): str(v) for k, v in md.get("tags", {}).items()}
    tags.update({f"lineage.{k}": str(v) for k, v in md.get("lineage", {}).items() if v is not None})
    tags.update({f"metric.{k}": str(v) for k, v in md.get("metrics", {}).items()})
    for key in ("base_model", "base_fingerprint", "rank", "alpha", "parent_version"):
        if md.get(key) is not None:
            tags[key] = str(md[key])
    tags["registry.ref"] = av.ref
    tags["registry.sha256"] = _weights_sha(av)
    return tags


def _weights_sha(av) -> str:
    import json

    from ground.adapter_files import ADAPTER_WEIGHTS
    from ground.errors import RegistryError
    from registry.integrity import read_regular

    try:  # a regular file only: a FIFO here would block the publish that mirrors this version
        return json.loads(read_regular(av.path / "manifest.json", av.ref))["files"][ADAPTER_WEIGHTS]["sha256"]
    except (OSError, ValueError, KeyError, TypeError, RegistryError):
        return ""


class MlflowMirror:
    def __init__(self, tracking_uri: str, registry_uri: str | None = None):
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri or tracking_uri

    @cached_property
    def client(self):
        from mlflow import MlflowClient  # heavy import: only when a mirror is actually used

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)

    def _guard(self, what: str, fn, *args):
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - the mirror must never break the registry
            log.warning("MLflow mirror (%s): %s failed: %s: %s; the registry itself is fine, the next publish "
                        "catches the mirror up", redact_uri(self.tracking_uri), what, exc.__class__.__name__, exc)
            return None

    # ---------------------------------------------------------------------------------------------------------
    def _mirrored_upto(self, name: str) -> int:
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            self.client.create_registered_model(name, tags={"registry": "lora-pipeline"},
                                                description="LoRA adapter mirrored from the lora-pipeline registry.")
            return 0
        upto = int(model.tags.get(MIRRORED_UPTO, 0))
        found = self.client.search_model_versions(f"name='{name}'", max_results=1, order_by=["version_number DESC"])
        return max(upto, int(found[0].version) if found else 0)

    def _sync(self, registry, name: str) -> None:
        latest = registry.store.latest_version(name) or 0
        done = self._mirrored_upto(name)
        for number in range(done + 1, latest + 1):
            path = registry.store.version_dir(name, number)
            av = registry.get_version(name, number) if path is not None else None
            run_id = av.lineage.get("mlflow_run_id") if av else None
            mv = self.client.create_model_version(
                name, source=(path.absolute().as_uri() if path else f"deleted:{name}@{number}"),
                run_id=run_id, tags=version_tags(av) if av else {"registry.deleted": "true"},
                description=(av.metadata.get("tags", {}).get("description") if av else None))
            if int(mv.version) != number:
                log.warning("MLflow registered %s as version %s, not %d: MLflow's `%s` holds versions this registry "
                            "never published; the tag registry.ref names the registry version", name, mv.version,
                            number, name)
            if av is None:  # a number deleted here before it was mirrored: keep MLflow's numbering in step
                self.client.delete_model_version(name, mv.version)
            self.client.set_registered_model_tag(name, MIRRORED_UPTO, str(number))
        self._sync_aliases(registry, name)

    def _sync_aliases(self, registry, name: str) -> None:
        wanted = registry.store.read_aliases(name)
        current = self.client.get_registered_model(name).aliases
        for alias, version in wanted.items():
            if int(current.get(alias, -1)) != version:
                self.client.set_registered_model_alias(name, alias, str(version))
        for alias in set(current) - set(wanted):
            self.client.delete_registered_model_alias(name, alias)

    # ---------------------------------------------------------------------------------------------------------
    def sync(self, registry, name: str) -> None:
        """Register every version of `name` MLflow lacks, in order, and make MLflow's aliases match ours."""
        self._guard(f"sync of {name}", self._sync, registry, name)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self._guard(f"alias {name}@{alias}", self.client.set_registered_model_alias, name, alias, str(version))

    def delete_alias(self, name: str, alias: str) -> None:
        self._guard(f"delete alias {name}@{alias}", self.client.delete_registered_model_alias, name, alias)

    def delete_version(self, name: str, version: int) -> None:
        self._guard(f"delete {name}@{version}", self.client.delete_model_version, name, str(version))
