"""Model folder helpers shared by staging and the registry: integrity checks and the base-model fingerprint.

A fingerprint is the sha256 over (relative path, sha256 of contents) of the files that define what the
model computes: `config.json` and every weight file. Tokenizer files are left out on purpose: re-saving a
tokenizer with another library version changes its bytes but not the model. The hashes are computed
streaming, so a multi-GB checkpoint never sits in memory.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from ground.errors import StageError

WEIGHT_SUFFIXES = (".safetensors",)
CHUNK = 8 << 20


def sha256_file(path: Path, progress: tqdm | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if progress is not None:
                progress.update(len(chunk))
    return h.hexdigest()


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def fingerprint_files(model_dir: Path) -> list[Path]:
    files = weight_files(model_dir)
    cfg = model_dir / "config.json"
    return ([cfg] if cfg.is_file() else []) + files


def check_model_dir(model_dir: Path) -> None:
    """A Hugging Face model folder: config.json plus safetensors weights that are not truncated or garbled."""
    if not (model_dir / "config.json").is_file():
        raise StageError(
            f"`{model_dir}` has no config.json, so it is not a Hugging Face model folder. "
            "Point actor_rollout_ref.model.path at the folder that holds config.json and *.safetensors."
        )
    weights = weight_files(model_dir)
    if not weights:
        bins = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
        extra = (
            f" It holds pickle weights ({', '.join(bins[:3])}), which this project never unpickles; convert them "
            "to safetensors first (e.g. `model.save_pretrained(dir, safe_serialization=True)`)."
            if bins
            else ""
        )
        raise StageError(f"`{model_dir}` has no *.safetensors weight files.{extra}")
    for path in weights:
        check_safetensors(path)


def check_safetensors(path: Path) -> dict:
    """Parse the header and check the file is exactly as long as the header says. Returns the header."""
    size = path.stat().st_size
    bad = f"Weight file `{path}` is corrupted or truncated"
    fix = "Re-download or re-copy the model folder."
    if size < 8:
        raise StageError(f"{bad}: it is only {size} bytes. {fix}")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8 or header_len > 100 << 20:
            raise StageError(f"{bad}: its header claims {header_len} bytes but the file has {size}. {fix}")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise StageError(f"{bad}: its header is not valid JSON. {fix}") from None
    if not isinstance(header, dict):
        raise StageError(f"{bad}: its header is not a mapping. {fix}")
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise StageError(f"{bad}: its tensors need {8 + header_len + end} bytes but the file has {size}. {fix}")
    return header


def file_hashes(model_dir: Path, files: Iterable[Path], desc: str = "hashing") -> dict[str, str]:
    files = list(files)
    total = sum(p.stat().st_size for p in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False, disable=total < 64 << 20) as bar:
        return {str(p.relative_to(model_dir)): sha256_file(p, bar) for p in files}


def fingerprint_from_hashes(hashes: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(hashes):
        h.update(f"{name}\0{hashes[name]}\n".encode())
    return h.hexdigest()


def fingerprint(model_dir: str | Path) -> str:
    """The base-model fingerprint (see module docstring)."""
    model_dir = Path(model_dir)
    return fingerprint_from_hashes(file_hashes(model_dir, fingerprint_files(model_dir), desc="fingerprint"))


def stored_dtype(config: dict) -> str:
    """The dtype a model's config.json says its weights are in ("bfloat16", ...): `dtype` in newer transformers,
    `torch_dtype` in older ones (the same field renamed); float32 when neither is there, as transformers assumes."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(name).lower().removeprefix("torch.")
