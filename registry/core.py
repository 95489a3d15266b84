"""The adapter registry: adapters (names), immutable adapter versions (1, 2, 3, ...) and movable aliases.

MLflow's vocabulary: an *adapter* is a registered name, an *adapter version* is one published adapter that never
changes, an *alias* (`prod`) points at a version and moves. References: `NAME`, `NAME@7`, `NAME@prod`.

A version folder holds exactly what PEFT's `PeftModel.from_pretrained` and vLLM's `LoRARequest` load:

    adapter_model.safetensors   the LoRA tensors, byte for byte as published
    adapter_config.json         PEFT's config, byte for byte (lora_alpha preserved)
    metadata.json               base model id + fingerprint, rank, alpha, target modules, lineage, metrics, tags, ...
    manifest.json               sha256 and size of the three files above (what `verify` recomputes)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ground.errors import NotFoundError, RegistryError
from registry.integrity import MANIFEST, METADATA, PAYLOAD, VerifyReport, open_regular
from registry.history import new_event
from registry.lifecycle import Lifecycle
from registry.refs import check_alias, check_name, check_version, format_versions, parse_ref
from registry.store import Store
from registry.validate import CONFIG, validate_adapter

log = logging.getLogger(__name__)

CHUNK = 8 << 20
DEFAULT_URI = "./registry-store"


class AdapterVersion:
    """One immutable adapter version. `path` is a local folder PEFT and vLLM load directly (for a remote store,
    a verified cache folder, downloaded the first time `path` is read). Equal when name and version are."""

    __slots__ = ("name", "version", "metadata", "_path", "_fetch")

    def __init__(self, name: str, version: int, path: Path | None = None, metadata: dict | None = None,
                 fetch: Callable[[], Path] | None = None):
        self.name, self.version, self.metadata = name, int(version), dict(metadata or {})
        self._path, self._fetch = (Path(path) if path is not None else None), fetch
        if self.metadata.get("version") is None:  # remote stores number at the visible step: see Store.commit
            self.metadata["version"] = self.version

    def __repr__(self) -> str:
        return f"AdapterVersion({self.name!r}, {self.version})"

    def __eq__(self, other) -> bool:
        return isinstance(other, AdapterVersion) and (self.name, self.version) == (other.name, other.version)

    def __hash__(self) -> int:
        return hash((self.name, self.version))

    @property
    def path(self) -> Path:
        if self._path is None:
            self._path = Path(self._fetch())
        return self._path

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def base_fingerprint(self) -> str | None:
        return self.metadata.get("base_fingerprint")

    @property
    def rank(self) -> int:
        return int(self.metadata.get("max_rank") or self.metadata.get("rank") or 0)

    @property
    def lineage(self) -> dict:
        return self.metadata.get("lineage", {})


def _copy_hashed(src: Path, dst: Path) -> dict:
    """Copy one file, hashing what is written, and fsync it. Returns its manifest entry."""
    h, size = hashlib.sha256(), 0
    with open_regular(src, str(src.parent)) as fin, open(dst, "wb") as fout:
        while chunk := fin.read(CHUNK):
            h.update(chunk)
            fout.write(chunk)
            size += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return {"sha256": h.hexdigest(), "size": size}


def _write_json(path: Path, obj) -> dict:
    data = (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _check_tags(tags) -> dict[str, str]:
    tags = dict(tags or {})
    for k, v in tags.items():
        if not isinstance(k, str) or not k or len(k) > 250:
            raise RegistryError(f"Invalid tag key {k!r}: tag keys are non-empty strings of at most 250 characters.")
        if len(str(v)) > 5000:
            raise RegistryError(f"Tag `{k}` is {len(str(v))} characters long; tag values hold at most 5000.")
    return {k: str(v) for k, v in tags.items()}


class Registry(Lifecycle):
    """The Python API behind `pipeline registry ...`. Open one with `open_registry(uri)`. Routes, history,
    rollback and gc: registry/lifecycle.py."""

    def __init__(self, store: Store, mirror=None):
        self.store = store
        self.mirror = mirror  # registry.mlflow_mirror.MlflowMirror or None

    @property
    def uri(self) -> str:
        return self.store.uri

    def __repr__(self) -> str:
        return f"Registry({self.uri!r})"

    # ------------------------------------------------------------------------------------------- reading
    def list_adapters(self) -> list[str]:
        return self.store.list_adapters()

    def _no_adapter(self, name: str) -> NotFoundError:
        names = self.list_adapters()
        known = ", ".join(names[:50]) + (" ..." if len(names) > 50 else "") if names else "no adapters yet"
        return NotFoundError(f"Adapter `{name}` does not exist in registry {self.uri} (it holds: {known}). "
                             "Publish it with `pipeline registry publish DIR --name NAME`.")

    def get_version(self, name: str, version: int) -> AdapterVersion:
        check_name(name)
        version = check_version(version)
        found = self.store.open_version(name, version)
        if found is None:
            versions = self.store.version_numbers(name)
            if not versions:
                raise self._no_adapter(name)
            raise NotFoundError(f"`{name}@{version}` does not exist; versions of `{name}`: "
                                f"{format_versions(versions)}; aliases: {self._alias_text(name)}.")
        metadata, fetch = found
        return AdapterVersion(name, version, metadata=metadata, fetch=fetch)

    def _alias_text(self, name: str) -> str:
        aliases = self.store.read_aliases(name)
        return ", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())) or "none"

    def resolve(self, ref: str) -> AdapterVersion:
        """`NAME` (latest), `NAME@7` or `NAME@prod` -> the version. Raises NotFoundError listing what exists."""
        name, version, alias = parse_ref(ref)
        if alias is not None:
            version = self.store.resolve_alias(name, alias)
            if version is None:
                if not self.store.latest_version(name):
                    raise self._no_adapter(name)
                raise NotFoundError(f"Alias `{alias}` of adapter `{name}` does not exist (aliases: "
                                    f"{self._alias_text(name)}; versions: "
                                    f"{format_versions(self.store.version_numbers(name))}).")
        elif version is None:
            version = self.store.latest_version(name)
            if version is None:
                raise self._no_adapter(name)
        return self.get_version(name, version)

    def list_versions(self, name: str) -> list[AdapterVersion]:
        check_name(name)
        found = self.store.list_versions(name)
        if not found:
            raise self._no_adapter(name)
        return [AdapterVersion(name, v, metadata=md, fetch=fetch) for v, md, fetch in found]

    def aliases(self, name: str) -> dict[str, int]:
        return dict(self.store.read_aliases(check_name(name)))

    def max_rank(self) -> int:
        """Largest LoRA rank over every version (vLLM's max_lora_rank must cover it); 0 for an empty registry."""
        return max((v.rank for n in self.list_adapters() for v in self.list_versions(n)), default=0)

    # ------------------------------------------------------------------------------------------- publishing
    def publish(self, adapter_dir, name: str, *, base_dir=None, base_fingerprint: str | None = None,
                alias: str | None = None, tags: dict | None = None, lineage: dict | None = None,
                metrics: dict | None = None, parent_version=None) -> AdapterVersion:
        """Validate a PEFT LoRA folder and store it as the next version of `name` (atomically)."""
        check_name(name)
        if alias is not None:
            check_alias(alias)
        tags, lineage, metrics = _check_tags(tags), dict(lineage or {}), dict(metrics or {})
        if parent_version is not None and not isinstance(parent_version, int):
            parse_ref(str(parent_version))  # a reference to another adapter's version, e.g. `base-sft@3`
        adapter_dir = Path(adapter_dir).expanduser()
        if not adapter_dir.is_dir():
            raise RegistryError(f"Adapter folder `{adapter_dir}` does not exist or is not a folder.")

        base_path = self._base_dir(adapter_dir, base_dir)
        with self.store.staging() as staged:
            # validate the staged copy, not the source, so what is stored is exactly what was checked
            entries = {}
            validate_adapter(adapter_dir, base_path)  # fail fast (and refuse .bin) before copying anything
            for fname in PAYLOAD:
                entries[fname] = _copy_hashed(adapter_dir / fname, staged / fname)
            info = validate_adapter(staged, base_path)
            if base_path is not None and base_fingerprint is None:
                from ground.model_files import fingerprint

                base_fingerprint = fingerprint(base_path)
            now = time.time()
            metadata = {
                "format": 1,
                "name": name,
                "created": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
                "created_unix": now,
                "base_model": lineage.get("base_model") or info.config.get("base_model_name_or_path")
                or (str(base_path) if base_path else None),
                "base_path": str(base_path.absolute()) if base_path else None,
                "base_fingerprint": base_fingerprint,
                "peft_type": "LORA",
                "rank": info.rank,
                "max_rank": info.max_rank,
                "alpha": info.alpha,
                "target_modules": info.target_modules,
                "num_modules": len(info.modules),
                "num_parameters": info.num_parameters,
                "lineage": lineage,
                "metrics": metrics,
                "parent_version": parent_version,
                "tags": tags,
                "source": str(adapter_dir.absolute()),
                "publisher": {"host": socket.gethostname(), "pid": os.getpid()},
            }

            def finish(folder: Path, version: int | None) -> None:
                metadata["version"] = version
                entries[METADATA] = _write_json(folder / METADATA, metadata)
                _write_json(folder / MANIFEST, {"algorithm": "sha256", "files": entries})

            def after(version: int) -> None:  # still under the adapter's lock
                if alias is not None:
                    before = self.store.read_aliases(name).get(alias)
                    self.store.update_aliases(name, lambda a: {**a, alias: version})
                    self._alias_event(name, "alias_set", alias, before, version, reason=f"published {name}@{version}")
                if self.mirror is not None:
                    self.mirror.sync(self, name)

            version = self.store.commit(name, staged, finish, after)
        log.info("published %s@%d%s", name, version, f" (alias {alias})" if alias else "")
        return self.get_version(name, version)

    @staticmethod
    def _base_dir(adapter_dir: Path, base_dir) -> Path | None:
        if base_dir is not None:
            base = Path(base_dir).expanduser()
            if not base.is_dir():
                raise RegistryError(f"Base model folder `{base}` (--base) does not exist.")
            return base
        try:  # default: the adapter config's base_model_name_or_path, when that is a local folder
            declared = json.loads((adapter_dir / CONFIG).read_text()).get("base_model_name_or_path")
        except (OSError, ValueError):
            return None  # validation reports the missing/bad config
        if declared and Path(declared).is_dir() and (Path(declared) / "config.json").is_file():
            return Path(declared)
        return None

    # ------------------------------------------------------------------------------------------- aliases
    def set_alias(self, name: str, alias: str, version: int, *, reason: str = "", kind: str = "alias_set",
                  figures: dict | None = None) -> None:
        """Point `alias` at `version`; recorded in the history as an event of `kind` (`promote` passes its own)."""
        check_alias(alias)
        new_event(name, kind, before=None, after=None, figures=figures)  # a bad kind or figures refuse before the move
        target = self.get_version(name, version).version
        before = []

        def change(aliases):
            # re-check under the lock: the version could have been deleted since
            if self.store.open_version(name, target) is None:
                raise NotFoundError(f"`{name}@{target}` was deleted; cannot point alias `{alias}` at it.")
            before.append(aliases.get(alias))
            return {**aliases, alias: target}

        with self.store.locked(name):
            self.store.update_aliases(name, change)
            if self.mirror is not None:
                self.mirror.set_alias(name, alias, target)
            self._alias_event(name, kind, alias, before[0], target, reason, figures)

    def delete_alias(self, name: str, alias: str, *, reason: str = "") -> None:
        check_name(name)
        check_alias(alias)
        before = []

        def change(aliases):
            if alias not in aliases:
                raise NotFoundError(f"Alias `{alias}` of `{name}` does not exist (aliases: {self._alias_text(name)}).")
            before.append(aliases[alias])
            return {a: v for a, v in aliases.items() if a != alias}

        with self.store.locked(name):
            self.store.update_aliases(name, change)
            if self.mirror is not None:
                self.mirror.delete_alias(name, alias)
            self._alias_event(name, "alias_delete", alias, before[0], None, reason)

    # ------------------------------------------------------------------------------------------- removing
    def delete_version(self, name: str, version: int, force: bool = False) -> None:
        """Delete one version; refused while an alias points at it unless `force` (which drops those aliases), and
        while the route names it by number (change the route first, whatever `force` says)."""
        version = self.get_version(name, version).version
        dropped = []

        def check(aliases):
            pointing = sorted(a for a, v in aliases.items() if v == version)
            if pointing and not force:
                raise RegistryError(f"`{name}@{version}` is what alias(es) {', '.join(pointing)} point at; move them "
                                    "first (`pipeline registry alias set ...`) or delete with --force, which also "
                                    "deletes those aliases.")
            dropped.extend(pointing)
            return {a: v for a, v in aliases.items() if v != version}

        with self.store.locked(name):
            route, _ = self._route_now(name)
            if route is not None and str(version) in [t for t, _ in route.targets] + [route.mirror]:
                raise RegistryError(f"`{name}@{version}` is a target of the route of `{name}` ({route.describe()}); "
                                    f"change it first (`pipeline registry route set {name} ...` or `route clear "
                                    f"{name}`).")
            self.store.remove_version(name, version, check)
            if self.mirror is not None:
                self.mirror.delete_version(name, version)
            for alias in dropped:
                self._alias_event(name, "alias_delete", alias, version, None, f"{name}@{version} deleted (--force)")
        log.info("deleted %s@%d", name, version)

    # ------------------------------------------------------------------------------------------- integrity
    def verify(self, ref: str | None = None) -> VerifyReport:
        """Recompute every hash of one version (`ref`) or of the whole registry; report what is wrong."""
        report = VerifyReport()
        if ref is not None:
            targets = [self.resolve(ref)]
        else:
            targets = [v for n in self.list_adapters() for v in self._versions_for_verify(n, report)]
        for av in targets:
            report.checked.append(av.ref)
            report.problems.extend(self.store.verify_version(av.ref, av.name, av.version))
        if ref is None:
            for name in self.list_adapters():
                existing = set(self.store.version_numbers(name))
                for alias, v in self.store.read_aliases(name).items():
                    if v not in existing:
                        report.problems.append(f"alias {name}@{alias} points at missing version {v}")
        return report

    def _versions_for_verify(self, name: str, report: VerifyReport) -> list[AdapterVersion]:
        out = []
        for v in self.store.version_numbers(name):
            try:
                out.append(self.get_version(name, v))
            except RegistryError as exc:
                report.checked.append(f"{name}@{v}")
                problems = self.store.verify_version(f"{name}@{v}", name, v)
                report.problems.extend(problems or [str(exc)])
        return out

    def cleanup(self, max_age_s: float | None = None) -> list[str]:
        """Remove what writers that died left behind (staged uploads, work folders); one line per leftover."""
        return self.store.cleanup(max_age_s)

    # ------------------------------------------------------------------------------------------- transfer
    def import_adapter(self, src: str, name: str, **publish_kwargs) -> AdapterVersion:
        """Publish an existing PEFT adapter from a local folder or a Hugging Face repo id (`owner/repo[@rev]`)."""
        from registry.hub import import_source

        return import_source(self, src, name, **publish_kwargs)

    def export(self, ref: str, out_dir, merge: bool = False, base_dir=None) -> Path:
        """Copy a version's PEFT files to `out_dir`, or (merge=True) write base + adapter as one full model."""
        from registry.export import export_adapter, export_merged

        av = self.resolve(ref)
        return export_merged(av, Path(out_dir), base_dir) if merge else export_adapter(av, Path(out_dir))

    def push(self, ref: str, repo_id: str, **kwargs) -> str:
        """Upload a version's PEFT files (+ metadata) to a Hugging Face Hub repo; returns the commit URL."""
        from registry.hub import push_version

        return push_version(self.resolve(ref), repo_id, **kwargs)

