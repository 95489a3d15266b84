"""Export a version: its PEFT files as they are, or merged into its base as one full safetensors model.

Merging computes W' = W + (alpha / r) * B @ A for every adapted module (PEFT's `merge_and_unload`, which also
applies rsLoRA's alpha / sqrt(r) and rank/alpha patterns), so the exported model's outputs equal base plus
adapter. The base is the folder recorded at publish time unless `base_dir` overrides it; when the version
recorded a base fingerprint, the base given must have the same one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ground.adapter_files import version_file_path
from ground.errors import RegistryError
from registry.integrity import (CHUNK, MANIFEST, METADATA, PAYLOAD, manifest_files, open_regular, read_regular,
                                verify_folder)

if TYPE_CHECKING:  # annotations only: registry.core imports this module when it exports/imports
    from registry.core import AdapterVersion

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json", "added_tokens.json")


def _out_folder(out_dir) -> Path:
    """The folder to write: a symlink (`--out LINK`) is followed, so the export lands where the link points."""
    out_dir = Path(out_dir).expanduser()
    return out_dir.resolve() if out_dir.is_symlink() else out_dir.absolute()


def _fresh_out(out_dir: Path) -> Path:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise RegistryError(f"Export folder `{out_dir}` already exists and is not empty; choose a new --out folder.")
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise RegistryError(f"Cannot export into `{out_dir}`: creating `{tmp}` failed ({exc.strerror}). Choose an "
                            "--out folder you can write to.") from None
    return tmp


def _finish(tmp: Path, out_dir: Path) -> Path:
    try:
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.rename(tmp, out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RegistryError(f"Cannot export into `{out_dir}`: {exc.strerror}. Choose a new --out folder.") from None
    return out_dir


def _copy_checked(av: AdapterVersion, tmp: Path) -> None:
    """Copy the version's PEFT files and metadata, each hashed while copied and compared with its manifest.

    File names are the fixed ones a version holds; the manifest's names are checked too (a manifest naming
    `../x` refuses the version), and only regular files are read (a FIFO would block the copy forever)."""
    manifest_path = av.path / MANIFEST
    try:
        files = manifest_files(av.ref, json.loads(read_regular(manifest_path, av.ref)), str(manifest_path))
    except (OSError, ValueError) as exc:
        raise RegistryError(f"Cannot export {av.ref}: {manifest_path} is unreadable ({exc.__class__.__name__}); run "
                            f"`pipeline registry verify {av.ref}`.") from None
    for fname in (*PAYLOAD, METADATA):
        entry = files.get(fname) if isinstance(files.get(fname), dict) else {}
        h = hashlib.sha256()
        try:
            with open_regular(version_file_path(av.path, av.ref, fname, str(manifest_path)), av.ref) as src, \
                    open(tmp / fname, "wb") as dst:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
        except FileNotFoundError:
            raise RegistryError(f"Cannot export {av.ref}: {fname} is missing; run `pipeline registry verify "
                                f"{av.ref}`.") from None
        if h.hexdigest() != entry.get("sha256"):
            raise RegistryError(f"Cannot export {av.ref}: {fname} does not match its manifest (sha256 "
                                f"{h.hexdigest()[:16]}..., manifest says {str(entry.get('sha256'))[:16]}...). Run "
                                f"`pipeline registry verify {av.ref}` and publish it again.")


def export_adapter(av: AdapterVersion, out_dir: Path) -> Path:
    """Copy the PEFT files (and the registry metadata) of `av` to `out_dir`, checked against its manifest."""
    out_dir = _out_folder(out_dir)
    tmp = _fresh_out(out_dir)
    try:
        _copy_checked(av, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s to %s", av.ref, out_dir)
    return _finish(tmp, out_dir)


def _base_for(av: AdapterVersion, base_dir) -> Path:
    base = Path(base_dir) if base_dir else (Path(av.metadata["base_path"]) if av.metadata.get("base_path") else None)
    if base is None or not (base / "config.json").is_file():
        raise RegistryError(f"Cannot merge {av.ref}: its base model folder "
                            f"`{base or av.metadata.get('base_model')}` is not available here. Pass it with --base PATH.")
    want = av.base_fingerprint
    if want:
        from ground.model_files import fingerprint

        got = fingerprint(base)
        if got != want:
            raise RegistryError(f"Cannot merge {av.ref} into `{base}`: that base has fingerprint {got[:16]}..., but "
                                f"the adapter was published against {want[:16]}... Pass the right base with --base PATH.")
    return base


def export_merged(av: AdapterVersion, out_dir: Path, base_dir=None) -> Path:
    """Write base + adapter as one Hugging Face model folder (safetensors, with the base's tokenizer files)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    problems = verify_folder(av.ref, av.path)  # PEFT reads the folder itself: check it first
    if problems:
        raise RegistryError(f"Cannot merge {av.ref}: {'; '.join(problems[:3])}.")
    base = _base_for(av, base_dir)
    out_dir = _out_folder(out_dir)
    tmp = _fresh_out(out_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
        with torch.no_grad():
            merged = PeftModel.from_pretrained(model, av.path).merge_and_unload()
        merged.save_pretrained(tmp, safe_serialization=True)
        for fname in TOKENIZER_FILES:
            if (base / fname).is_file():
                shutil.copy2(base / fname, tmp / fname)
        (tmp / "merged_from.json").write_text(json.dumps({
            "adapter": av.ref, "base_path": str(base), "base_fingerprint": av.base_fingerprint,
            "rank": av.metadata.get("rank"), "alpha": av.metadata.get("alpha")}, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("merged %s into %s -> %s", av.ref, base, out_dir)
    return _finish(tmp, out_dir)
