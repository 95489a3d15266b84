"""PEFT adapter folders: the file names PEFT and vLLM read, and the tensor keys PEFT writes.

An adapter folder holds `adapter_config.json` (PEFT's LoraConfig, lora_alpha included) and
`adapter_model.safetensors` (the LoRA tensors). `adapter_model.bin` is PEFT's older pickle format, which this
project never loads.
"""

from __future__ import annotations

import re

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"

# In memory PEFT names a LoRA tensor `...q_proj.lora_A.<adapter name>.weight`; on disk the adapter name is left out.
_ADAPTER_NAME_IN_KEY = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.[^.]+\.weight$")


def saved_key(name: str) -> str:
    """The key PEFT's `save_pretrained` writes for an in-memory parameter name.

    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight` ->
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`; names already in saved form pass through.
    """
    return _ADAPTER_NAME_IN_KEY.sub(lambda m: f".{m.group(1)}.weight", name)


# ---------------------------------------------------------------------------------------- a version's file names
# Every file an adapter version holds: the two PEFT files, the registry's metadata and the manifest that lists the
# others. Names arriving from a manifest, an MLflow tag, an artifact listing or a Hub repo are checked against this
# list before they are joined to a folder: anything else (`/abs/path`, `../../x`, `a/b`, a NUL) could otherwise
# write or read a file outside that folder.
VERSION_METADATA = "metadata.json"
VERSION_MANIFEST = "manifest.json"
VERSION_FILES = frozenset({ADAPTER_CONFIG, ADAPTER_WEIGHTS, VERSION_METADATA, VERSION_MANIFEST})


def check_version_files(ref: str, names, where: str) -> list[str]:
    """`names` (from `where`) if each is a plain name of VERSION_FILES; else RegistryError refusing version `ref`."""
    from ground.errors import RegistryError

    names = list(names)
    for name in names:
        if not isinstance(name, str) or name not in VERSION_FILES:
            raise RegistryError(
                f"Adapter version {ref} is refused: {where} lists the file name {str(name)[:120]!r}, which is not one "
                f"of the files a version holds ({', '.join(sorted(VERSION_FILES))}); nothing was read or written "
                f"under that name. The version was tampered with or written by another tool: delete it and publish "
                f"it again (`pipeline registry delete {ref} --force`, then `pipeline registry publish`).")
    return names


def version_file_path(folder, ref: str, name: str, where: str):
    """`folder / name` after `check_version_files`, and only if it stays inside `folder` once resolved."""
    from pathlib import Path

    from ground.errors import RegistryError

    check_version_files(ref, [name], where)
    folder = Path(folder)
    path = folder / name
    # a plain name can leave `folder` only through a link planted under that name (one lstat to rule that out)
    if path.is_symlink() and path.resolve().parent != folder.resolve():
        raise RegistryError(f"Adapter version {ref} is refused: {path} resolves to {path.resolve()}, outside its "
                            f"folder {folder} (a planted link). Delete the version and publish it again.")
    return path
