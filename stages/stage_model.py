"""Stage 1: stage the base model.

Resolve `actor_rollout_ref.model.path` (a local folder, a Hugging Face repo id, or the packaged default),
check its weights, fingerprint it, and with `use_shm=True` copy it into a RAM-backed folder (vLLM and the
actor workers then read weights from memory). Outputs: `model_dir`, `source_dir`, `fingerprint`, `shm_copy`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

from config import Config
from ground.errors import StageError
from ground.base_model import resolve_model_path
from ground.model_files import check_model_dir, file_hashes, fingerprint_from_hashes, fingerprint_files

log = logging.getLogger(__name__)

SHM_MANIFEST = ".staged.json"


def model_files(model_dir: Path) -> list[Path]:
    """Every file of the model folder, hidden ones (our own markers) excluded."""
    return sorted(p for p in model_dir.rglob("*") if p.is_file() and not p.name.startswith("."))


def copy_to_shm(source: Path, hashes: dict[str, str], shm_root: Path, fp: str) -> Path:
    """Copy the model under shm_root, reusing an earlier copy whose files, sizes and hashes all match."""
    shm_root.mkdir(parents=True, exist_ok=True)
    target = shm_root / f"lora-pipeline-base-{fp[:16]}"
    files = model_files(source)
    sizes = {str(p.relative_to(source)): p.stat().st_size for p in files}
    if os.path.lexists(target):
        # Only a folder this stage made (it holds our marker) is reused, replaced, or removed at the end.
        if target.is_symlink() or not target.is_dir() or not (target / SHM_MANIFEST).is_file():
            raise StageError(
                f"`{target}` exists but was not staged by lora-pipeline (it has no {SHM_MANIFEST}); it is left "
                "as it is. Move it away, or set actor_rollout_ref.model.shm_root to another RAM-backed folder."
            )
        if _copy_matches(target, sizes, hashes):
            log.info("Reusing the staged copy at %s", target)
            return target
        log.info("Staged copy at %s does not match the source; replacing it", target)
        shutil.rmtree(target)
    need = sum(sizes.values())
    free = shutil.disk_usage(shm_root).free
    if need > free:
        raise StageError(
            f"Not enough space in `{shm_root}` to stage the base model: it needs {need / 2**20:.0f} MiB and "
            f"{free / 2**20:.0f} MiB are free. Free space there, set actor_rollout_ref.model.shm_root to a larger "
            "RAM-backed folder, or set actor_rollout_ref.model.use_shm=False."
        )
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=shm_root))
    try:
        with tqdm(total=need, unit="B", unit_scale=True, desc=f"staging to {shm_root}", leave=False) as bar:
            for path in files:
                rel = path.relative_to(source)
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                with open(path, "rb") as src, open(tmp / rel, "wb") as dst:
                    while chunk := src.read(8 << 20):
                        dst.write(chunk)
                        bar.update(len(chunk))
        (tmp / SHM_MANIFEST).write_text(json.dumps({"sizes": sizes, "hashes": hashes}))
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-copied stays in RAM
        raise
    return target


def _copy_matches(target: Path, sizes: dict[str, int], hashes: dict[str, str]) -> bool:
    present = {str(p.relative_to(target)): p.stat().st_size for p in model_files(target)}
    if present != sizes:
        return False
    return file_hashes(target, [target / n for n in hashes], desc="verify staged copy") == hashes


def stage_model(cfg: Config) -> dict:
    """Run the stage; returns its outputs for the manifest and the later stages."""
    m = cfg.actor_rollout_ref.model
    source = resolve_model_path(m.path)
    check_model_dir(source)
    # Hash every file once: the fingerprint uses config + weights, the shm reuse check all of them.
    hashes = file_hashes(source, model_files(source), desc="fingerprint")
    fp_names = {str(p.relative_to(source)) for p in fingerprint_files(source)}
    fp = fingerprint_from_hashes({k: v for k, v in hashes.items() if k in fp_names})
    log.info("Base model %s: fingerprint %s", source, fp[:16])
    model_dir, shm_copy = source, None
    if m.use_shm:
        model_dir = shm_copy = copy_to_shm(source, hashes, Path(m.shm_root).expanduser(), fp)
    return {
        "model_name": m.path,
        "source_dir": str(source),
        "model_dir": str(model_dir),
        "fingerprint": fp,
        "shm_copy": str(shm_copy) if shm_copy else None,
        "keep_shm_copy": m.keep_shm_copy,
    }


def cleanup(outputs: dict) -> None:
    """Remove the RAM copy when the pipeline ends, unless asked to keep it."""
    copy = outputs.get("shm_copy")
    if copy and not outputs.get("keep_shm_copy") and Path(copy).exists():
        shutil.rmtree(copy, ignore_errors=True)
        log.info("Removed the staged copy %s", copy)
