"""The adapter a training run starts from: `actor_rollout_ref.model.lora_adapter_path` as a folder or a
registry reference (`NAME`, `NAME@3`, `NAME@prod`).

The training stage only ever gets a local folder. This module, which runs before it (the pipeline's train stage
and `pipeline train`), turns a reference into one: it resolves the reference in the registry named by
`registry.uri` (a local store or `mlflow+http(s)://`), pins the version it points at *now* (an alias may move
while the run trains; the run's lineage records both), has the registry hand out that version's local folder
(for a server: the verified per-machine cache) and re-hashes the folder against the version's manifest, so
training starts from exactly the published bytes or not at all.

An existing folder wins over a reference of the same spelling: a plain local path keeps working as before.
A value that is neither is a ConfigError naming it, the registry and what that registry holds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from config import Config
from ground.errors import ConfigError, NotFoundError, RegistryError
from ground.mlflow_uri import redact_uri

log = logging.getLogger(__name__)

KEY = "actor_rollout_ref.model.lora_adapter_path"
PIN_FILE = "start_adapter.json"


def _holdings(reg) -> str:
    try:
        names = reg.list_adapters()
    except RegistryError as exc:  # e.g. the server is unreachable: say so instead of a list
        return f"(could not list it: {exc})"
    if not names:
        return "no adapters yet"
    return "the adapters " + ", ".join(names[:20]) + (f" ... ({len(names)} in all)" if len(names) > 20 else "")


def _lookup(cfg: Config, value: str):
    """(registry, AdapterVersion) for a reference; ConfigError naming the value, the registry and its holdings."""
    from registry import open_registry, parse_ref, resolve_uri

    uri = resolve_uri(cfg.registry.uri)
    shown = redact_uri(uri)  # $PIPELINE_REGISTRY is not checked like registry.uri: it may still hold a secret
    try:
        parse_ref(value)
    except RegistryError as exc:
        try:
            holds = _holdings(open_registry(uri, mirror_mlflow=False))
        except RegistryError as bad_uri:
            holds = f"(it cannot be opened: {bad_uri})"
        raise ConfigError(
            f"{KEY}=`{value}` is neither an existing folder nor a registry reference (NAME, NAME@VERSION or "
            f"NAME@ALIAS; {exc}) Give a PEFT adapter folder that exists, or a reference to a version in registry "
            f"{shown} (registry.uri), which holds {holds}."
        ) from None
    try:
        reg = open_registry(uri, mirror_mlflow=False)  # reading only: nothing to mirror
        return reg, reg.resolve(value)
    except RegistryError as exc:  # NotFoundError lists the versions, aliases or adapters that do exist
        what = "has no such version" if isinstance(exc, NotFoundError) else "could not resolve it"
        raise ConfigError(f"{KEY}=`{value}` is not an existing folder, and registry {shown} (registry.uri) {what}: "
                          f"{exc}") from None


def check_start_adapter(cfg: Config) -> None:
    """The cheap part (no download): a reference that does not resolve fails before a run directory exists."""
    value = cfg.actor_rollout_ref.model.lora_adapter_path
    if value and not Path(value).expanduser().is_dir():
        _lookup(cfg, value)


def resolve_start_adapter(cfg: Config, pin_dir: str | Path | None = None) -> dict:
    """Resolve `lora_adapter_path` to a local folder; returns what the run records about its starting point.

    Keys: `path` (the folder training loads, or None without a starting adapter), `reference` (the value as
    configured), and for a registry reference `ref` (the pinned `NAME@V`), `name`, `version`, `registry`,
    `weights_sha256`. With `pin_dir`, the pinned version is written there (PIN_FILE) and a later call with the
    same folder (a resumed run) resolves that version again instead of wherever the alias points by then.
    """
    from registry.integrity import MANIFEST, verify_folder
    from registry.validate import WEIGHTS

    value = cfg.actor_rollout_ref.model.lora_adapter_path
    if not value:
        return {"path": None, "reference": None}
    if Path(value).expanduser().is_dir():
        return {"path": str(Path(value).expanduser()), "reference": value}
    pin = Path(pin_dir) / PIN_FILE if pin_dir is not None else None
    pinned = json.loads(pin.read_text()) if pin is not None and pin.is_file() else None
    if pinned is not None and pinned.get("reference") == value:
        reg, av = _lookup(cfg, pinned["ref"])
        log.info("start adapter %s: pinned to %s by this run's first attempt", value, av.ref)
    else:
        reg, av = _lookup(cfg, value)
    where = redact_uri(reg.uri)
    try:
        folder = av.path  # for a server: downloaded into the verified cache (or found there)
    except RegistryError as exc:
        raise ConfigError(f"{KEY}=`{value}` resolved to {av.ref} in registry {where}, but its files could not be "
                          f"fetched: {exc}") from None
    problems = verify_folder(av.ref, Path(folder))
    if problems:
        raise RegistryError(f"{KEY}=`{value}` resolved to {av.ref} in registry {where}, whose files do not match "
                            f"its manifest, so training does not start from it: {'; '.join(problems)}. Run "
                            f"`pipeline registry --registry {where} verify {av.ref}`.")
    manifest = json.loads((Path(folder) / MANIFEST).read_text())
    info = {
        "path": str(folder),
        "reference": value,
        "ref": av.ref,
        "name": av.name,
        "version": av.version,
        "registry": where,
        "weights_sha256": manifest["files"][WEIGHTS]["sha256"],
    }
    if pin is not None:
        pin.parent.mkdir(parents=True, exist_ok=True)
        pin.write_text(json.dumps(info, indent=1))
    log.info("start adapter %s -> %s (verified copy at %s)", value, av.ref, folder)
    return info


def with_start_folder(cfg: Config, start: dict) -> Config:
    """A copy of the config whose `lora_adapter_path` is the resolved local folder (what training loads)."""
    if start.get("path") is None or start["path"] == cfg.actor_rollout_ref.model.lora_adapter_path:
        return cfg
    resolved = cfg.model_copy(deep=True)
    resolved.actor_rollout_ref.model.lora_adapter_path = start["path"]
    return resolved
