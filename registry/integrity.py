"""Integrity of stored versions: the manifest (sha256 + size of every file) and its verification."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from registry.validate import CONFIG, WEIGHTS

METADATA = "metadata.json"
MANIFEST = "manifest.json"
PAYLOAD = (WEIGHTS, CONFIG)
CACHE_MARKER = ".verified"  # written by registry/cache.py into a cached copy it has checked
CHUNK = 8 << 20


@dataclass
class VerifyReport:
    """What `verify` found: versions checked and one line per problem (empty when all is well)."""

    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checked": self.checked, "problems": self.problems}


def verify_folder(ref: str, path: Path) -> list[str]:
    """Recompute the hashes of one version folder against its manifest; one line per problem."""
    problems = []
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{ref}: {MANIFEST} is missing or unreadable ({exc.__class__.__name__}: {exc})"]
    for fname, entry in sorted(files.items()):
        fpath = path / fname
        if not fpath.is_file():
            problems.append(f"{ref}: {fname} is missing")
            continue
        h = hashlib.sha256()
        with open(fpath, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        if h.hexdigest() != entry.get("sha256"):
            problems.append(f"{ref}: {fname} is corrupted (sha256 {h.hexdigest()[:16]}..., manifest says "
                            f"{str(entry.get('sha256'))[:16]}...)")
    for extra in sorted(set(os.listdir(path)) - set(files) - {MANIFEST, CACHE_MARKER}):
        problems.append(f"{ref}: unexpected file {extra} (not in the manifest)")
    for required in (*PAYLOAD, METADATA):
        if required not in files:
            problems.append(f"{ref}: the manifest does not list {required}")
    return problems
