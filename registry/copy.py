"""`pipeline registry copy SRC DST [NAME...]`: move adapters between registries, keeping what identifies them.

Each version keeps its number (a deleted number stays retired in the destination too), its metadata (lineage,
metrics, tags, base fingerprint, creation time) and its PEFT files byte for byte, checked against the source's
manifest on the way. The source's history events are appended as they were (same time, user and reason; events the
destination already holds are not added twice), then aliases and the route (traffic split and mirror) are set to
the source's, each move recorded in the destination's history as a copy. A copy can be repeated: versions already in the destination
with the same file hashes are skipped, so an interrupted copy is finished by running it again; a destination
version with other files under the same number is a conflict and stops the copy of that adapter.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from ground.errors import NotFoundError, RegistryError
from registry.core import Registry, _copy_hashed, _write_json
from registry.history import Event
from registry.integrity import MANIFEST, METADATA, PAYLOAD, manifest_files, read_regular, verify_folder
from registry.refs import check_name
from registry.validate import validate_adapter

log = logging.getLogger(__name__)


@dataclass
class CopyReport:
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    aliases: dict[str, dict[str, int]] = field(default_factory=dict)
    routes: dict[str, dict | None] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)  # history events appended per adapter


def _payload_hashes(av) -> dict[str, str]:
    manifest = manifest_files(av.ref, json.loads(read_regular(av.path / MANIFEST, av.ref)), str(av.path / MANIFEST))
    try:
        return {f: manifest[f]["sha256"] for f in PAYLOAD}
    except (KeyError, TypeError):
        raise RegistryError(f"{av.ref}: its manifest does not list the PEFT files; run `pipeline registry verify "
                            f"{av.ref}`.") from None


def copy_registry(src: Registry, dst: Registry, names: list[str] | None = None) -> CopyReport:
    """Copy `names` (default: every adapter of `src`) into `dst`; see the module docstring."""
    names = [check_name(n) for n in names] if names else src.list_adapters()
    report = CopyReport()
    for name in names:
        source_versions = src.list_versions(name)  # NotFoundError names what exists
        present = {}
        try:
            present = {av.version: av for av in dst.list_versions(name)}
        except NotFoundError:
            pass
        for av in tqdm(source_versions, desc=f"copy {name}", unit="version", leave=False,
                       disable=len(source_versions) < 10):
            if av.version in present:
                if _payload_hashes(present[av.version]) != _payload_hashes(av):
                    raise RegistryError(f"Cannot copy {av.ref} from {src.uri} to {dst.uri}: the destination already "
                                        f"has a different {av.ref} (other file hashes). Copy into another registry "
                                        "or delete the destination's adapter first.")
                report.skipped.append(av.ref)
                continue
            _copy_version(av, dst)
            report.copied.append(av.ref)
        report.events[name] = _copy_history(src, dst, name)
        reason = f"copied from {src.uri}"
        aliases = src.aliases(name)
        current = dst.aliases(name)
        for alias, version in sorted(aliases.items()):
            if current.get(alias) != version:
                dst.set_alias(name, alias, version, reason=reason)
        for alias in sorted(set(current) - set(aliases)):
            dst.delete_alias(name, alias, reason=reason)
        report.aliases[name] = aliases
        report.routes[name] = _copy_route(src, dst, name, reason)
    return report


def _event_key(event: Event) -> str:
    return json.dumps(asdict(event), sort_keys=True, default=str)


def _copy_history(src: Registry, dst: Registry, name: str) -> int:
    """Append the source's events the destination lacks, oldest first, unchanged (who did what, when, why)."""
    # the destination's records are read as history() reads the source's (Event.from_dict): a stored event of
    # another shape (without `figures`, say) must still match its copy, or every copy would append it again
    held = {_event_key(Event.from_dict(r)) for r in dst.store.read_events(name) if isinstance(r, dict)}
    added = 0
    for event in src.history(name):
        if _event_key(event) not in held:
            dst.store.append_event(name, event.to_json())
            added += 1
    return added


def _copy_route(src: Registry, dst: Registry, name: str, reason: str) -> dict | None:
    """Give the destination the source's traffic split (or none): a copied `NAME` must pick the same versions."""
    route, current = src.get_route(name), dst.get_route(name)
    if route is None or not route.targets:
        if current is not None and current.targets:
            dst.clear_route(name, reason=reason)
        return None
    wanted = {"targets": dict(route.targets), "mirror": route.mirror}
    if current is None or {"targets": dict(current.targets), "mirror": current.mirror} != wanted:
        dst.set_route(name, dict(route.targets), mirror=route.mirror, reason=reason)
    return wanted


def _copy_version(av, dst: Registry) -> None:
    problems = verify_folder(av.ref, av.path)  # never carry damaged files to another store
    if problems:
        raise RegistryError(f"Not copying {av.ref}: {'; '.join(problems)}.")
    store = dst.store
    if av.version > 1:
        store.retire_numbers(av.name, av.version - 1)
    with store.staging() as staged:
        entries = {fname: _copy_hashed(av.path / fname, staged / fname) for fname in PAYLOAD}
        validate_adapter(staged, None)
        metadata = dict(av.metadata)

        def finish(folder, version):
            metadata["version"] = version
            entries[METADATA] = _write_json(folder / METADATA, metadata)
            _write_json(folder / MANIFEST, {"algorithm": "sha256", "files": entries})

        store.commit(av.name, staged, finish, expect_version=av.version)
    log.info("copied %s to %s", av.ref, dst.uri)
