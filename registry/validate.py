"""Checks an adapter folder before it becomes a version: only what PEFT and vLLM can load as it is.

Reads JSON and safetensors headers only (no torch), so publishing stays light. Every refusal names the file,
the tensor or the config key, and the reason.

PEFT saves LoRA tensors as `base_model.model.<module>.lora_A.weight` with shape [r, in_features] and
`...lora_B.weight` with shape [out_features, r] (embeddings: `lora_embedding_A` [r, vocab] and
`lora_embedding_B` [hidden, r]); the base model's `<module>.weight` is [out_features, in_features]
(an embedding's is [vocab, hidden]). LoRA: https://arxiv.org/abs/2106.09685
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ground.errors import PipelineError, RegistryError
from ground.adapter_files import ADAPTER_CONFIG as CONFIG
from ground.adapter_files import ADAPTER_WEIGHTS as WEIGHTS
from ground.model_files import check_safetensors

PREFIX = "base_model.model."
FLOAT_DTYPES = {"F32", "F16", "BF16"}
LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight|(?P<emodule>.+)\.(?P<ekind>lora_embedding_[AB])")


@dataclass
class AdapterInfo:
    """What validation learned about an adapter; goes into the version's metadata."""

    config: dict
    rank: int
    alpha: float
    target_modules: list[str] | str
    modules: list[str] = field(default_factory=list)  # adapted module paths, e.g. model.layers.0.self_attn.q_proj
    max_rank: int = 0
    num_parameters: int = 0


def refuse(where: Path | str, why: str) -> RegistryError:
    return RegistryError(f"Refusing adapter `{where}`: {why}")


def read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / CONFIG
    if not path.is_file():
        raise refuse(adapter_dir, f"it has no {CONFIG}, so it is not a PEFT adapter folder "
                                  "(save one with `model.save_pretrained(dir)` on a PeftModel).")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise refuse(path, f"it is not valid JSON ({exc}).") from None
    if not isinstance(config, dict):
        raise refuse(path, "it is not a JSON object.")
    return config


def check_weights_file(adapter_dir: Path) -> Path:
    path = adapter_dir / WEIGHTS
    if path.is_file():
        return path
    pickles = [p.name for p in adapter_dir.glob("*.bin")] + [p.name for p in adapter_dir.glob("*.pt")]
    if pickles:
        raise refuse(adapter_dir, f"it ships only pickle weights ({', '.join(sorted(pickles))}), which this project "
                                  "never unpickles. Re-save the adapter with safetensors (`model.save_pretrained(dir, "
                                  f"safe_serialization=True)`) so it holds {WEIGHTS}.")
    raise refuse(adapter_dir, f"it has no {WEIGHTS}.")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: a key matches a module path ending in it (regex allowed)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _targeted(target_modules, module: str) -> bool:
    if target_modules in (None, "all-linear"):
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def check_config(config: dict, where: Path) -> None:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise refuse(where, f"peft_type is {config.get('peft_type')!r}; only LORA adapters can be published "
                            "(vLLM serves LoRA only).")
    if config.get("use_dora"):
        raise refuse(where, "use_dora is true: vLLM cannot serve DoRA adapters. Train with use_dora=false, or "
                            "merge the adapter into the base (`pipeline registry export --merge`) outside the registry.")
    if config.get("modules_to_save"):
        raise refuse(where, f"modules_to_save={config['modules_to_save']!r}: vLLM cannot serve adapters that replace "
                            "whole modules. Train without modules_to_save (LoRA on those modules instead).")
    if config.get("bias", "none") != "none":
        raise refuse(where, f"bias={config['bias']!r}: vLLM does not serve LoRA bias terms; train with bias='none'.")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank <= 0:
        raise refuse(where, f"r={rank!r} in {CONFIG}; the LoRA rank must be a positive integer.")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise refuse(where, f"lora_alpha={alpha!r} in {CONFIG}; it must be a positive number.")


def base_shapes(base_dir: Path) -> dict[str, list[int]]:
    """tensor name -> shape over every safetensors file of a base model folder (headers only)."""
    if not (base_dir / "config.json").is_file():
        raise RegistryError(f"Base model folder `{base_dir}` has no config.json; pass the folder that holds the "
                            "base model's config.json and *.safetensors (--base PATH).")
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise RegistryError(f"Base model folder `{base_dir}` has no *.safetensors files to check the adapter against.")
    shapes: dict[str, list[int]] = {}
    for path in files:
        try:
            header = check_safetensors(path)
        except PipelineError as exc:
            raise RegistryError(str(exc)) from None
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def _base_weight_shape(shapes: dict, module: str) -> list[int] | None:
    # a base saved from the bare model (LlamaModel) lacks the leading "model." of the causal-LM wrapper
    for key in (f"{module}.weight", f"{module.split('.', 1)[-1]}.weight"):
        if key in shapes:
            return shapes[key]
    return None


def validate_adapter(adapter_dir: Path, base_dir: Path | None = None) -> AdapterInfo:
    """Raise RegistryError with the reason unless `adapter_dir` is a LoRA adapter vLLM and PEFT load as is."""
    config = read_adapter_config(adapter_dir)
    weights = check_weights_file(adapter_dir)
    check_config(config, adapter_dir / CONFIG)
    try:
        header = check_safetensors(weights)
    except PipelineError as exc:
        raise refuse(weights, str(exc)) from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        raise refuse(weights, "it holds no tensors.")

    pairs: dict[str, dict[str, list[int]]] = {}
    for key, meta in tensors.items():
        if "lora_magnitude_vector" in key:
            raise refuse(weights, f"tensor `{key}` is a DoRA magnitude vector; vLLM cannot serve DoRA adapters.")
        m = LORA_KEY.fullmatch(key)
        if m is None:
            raise refuse(weights, f"tensor `{key}` is not a LoRA A/B matrix (a modules_to_save copy or bias?); "
                                  "vLLM serves plain LoRA adapters only.")
        if meta.get("dtype") not in FLOAT_DTYPES:
            raise refuse(weights, f"tensor `{key}` has dtype {meta.get('dtype')}; LoRA weights must be F32, F16 or BF16.")
        module = m.group("module") or m.group("emodule")
        kind = (m.group("kind") or m.group("ekind"))[-1]  # "A" or "B"
        if not module.startswith(PREFIX):
            raise refuse(weights, f"tensor `{key}` does not start with `{PREFIX}` as PEFT writes adapter tensors.")
        module = module[len(PREFIX):]
        if len(meta["shape"]) != 2:
            raise refuse(weights, f"tensor `{key}` has shape {meta['shape']}; LoRA matrices are 2-D.")
        pairs.setdefault(module, {})[kind] = meta["shape"]
        pairs[module]["embedding"] = "embedding" in key

    base = base_shapes(base_dir) if base_dir is not None else None
    target = config.get("target_modules")
    ranks, params = [], 0
    for module, p in sorted(pairs.items()):
        if "A" not in p or "B" not in p:
            raise refuse(weights, f"module `{module}` has lora_{'A' if 'A' in p else 'B'} but not its partner.")
        rank = int(_pattern_value(config.get("rank_pattern"), module, config["r"]))
        a, b = p["A"], p["B"]
        # lora_A: [r, in], lora_B: [out, r]; embeddings: lora_embedding_A [r, vocab], lora_embedding_B [hidden, r]
        rank_a, in_dim, out_dim, rank_b = a[0], a[1], b[0], b[1]
        if rank_a != rank or rank_b != rank:
            raise refuse(weights, f"module `{module}`: lora_A is {a} and lora_B is {b}, but {CONFIG} gives rank "
                                  f"{rank} (r / rank_pattern); the tensors and the config disagree.")
        if not _targeted(target, module):
            raise refuse(weights, f"module `{module}` carries LoRA tensors but is not in target_modules={target!r}.")
        if base is not None:
            shape = _base_weight_shape(base, module)
            if shape is None:
                raise refuse(weights, f"module `{module}` does not exist in the base model `{base_dir}`; the adapter "
                                      "was trained for another architecture. Pass the right base with --base PATH.")
            want = [shape[0], shape[1]] if p["embedding"] else [shape[1], shape[0]]  # (in, out)
            if [in_dim, out_dim] != want:
                raise refuse(weights, f"module `{module}`: the adapter maps {in_dim} -> {out_dim} features but the "
                                      f"base weight has shape {shape} ({want[0]} -> {want[1]}); the adapter was trained "
                                      f"for another base model than `{base_dir}`.")
        ranks.append(rank)
        params += rank * (in_dim + out_dim)
    return AdapterInfo(config=config, rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                       target_modules=sorted(target) if isinstance(target, list) else target,
                       modules=sorted(pairs), max_rank=max(ranks), num_parameters=params)
