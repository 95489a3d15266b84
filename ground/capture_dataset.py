"""The manifest `pipeline data from-serving` writes beside its data file, and what a run trained on that file
carries into its published version's lineage.

The rule (docs/flywheel.md): a training run whose `data.train_files` names a file that sits in a folder holding
`capture_dataset.json`, and that manifest lists that file, was trained on captured traffic; the publish stage
then records the manifest's path, its sha256 digest, its counts and window, and whether the file's digest still
matches the one the manifest recorded (a file edited after it was built is marked, not hidden).
"""

from __future__ import annotations

import json
from pathlib import Path

from ground.model_files import sha256_file

DATASET_MANIFEST = "capture_dataset.json"
MANIFEST_FORMAT = "lora-pipeline-capture-dataset/1"


def file_digest(path: str | Path) -> str:
    """`sha256:<hex>`, the digest as the manifest and the lineage spell it."""
    return "sha256:" + sha256_file(Path(path))


def capture_lineage(train_files) -> list[dict]:
    """For each of `train_files` (a path or a list) built by from-serving: its manifest, as lineage records."""
    files = [train_files] if isinstance(train_files, (str, Path)) else list(train_files or [])
    found = []
    for file in map(Path, files):
        manifest_path = file.parent / DATASET_MANIFEST
        if not manifest_path.is_file():
            continue
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError:
            continue  # not ours to judge here; the lineage simply does not claim it
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
                or file.name not in manifest.get("files", {}):
            continue
        found.append({
            "manifest": str(manifest_path.resolve()),
            "manifest_digest": file_digest(manifest_path),
            "data_file": str(file.resolve()),
            "data_file_matches": file.is_file() and file_digest(file) == manifest["files"][file.name],
            "capture": manifest.get("capture"),
            "adapter": manifest.get("adapter"),
            "window": manifest.get("window"),
            "counts": manifest.get("counts"),
            "filters": manifest.get("filters"),
        })
    return found
