"""Gather the policy's LoRA tensors (or merged weights) from FSDP2 shards.

Under FSDP2 every parameter is a DTensor sharded along dim 0; `full_tensor()` all-gathers one. Every rank must
call the gathers in the same order (they are collectives); the caller keeps only rank 0's result.

- whole:   every LoRA tensor is gathered on the device first, then all are moved to host memory. Peak extra
           device memory: the whole adapter.
- layered: (`rollout.layered_summon=True`) the tensors of one decoder layer are gathered, moved to host memory
           and released before the next layer starts. Peak extra device memory: one layer's LoRA tensors.
Both produce identical tensors (the same all-gathers, in a different grouping); tests check that.

Merged weights (sync mode `merged`) are always produced layer by layer: every weight of one layer, with
W + (alpha/r)·B·A for the LoRA-targeted linears, then the next layer. The whole model travels (see
`iter_merged_layers` for why).
"""

from __future__ import annotations

import re
from typing import Iterator

import torch
from torch import nn

from ground.adapter_files import saved_key
from stages.train.modeling import POLICY

_LAYER = re.compile(r"\.layers\.(\d+)\.")
_PREFIX = "peft."  # PolicyValueModel keeps the PEFT model under `peft`


def is_policy_lora(name: str) -> bool:
    """A trainable parameter of the policy adapter (not the critic's adapter, not the value head)."""
    return f".{POLICY}." in name and ".lora_" in name


def peft_name(name: str) -> str:
    """`peft.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`
    -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (the key in adapter_model.safetensors)."""
    return saved_key(name.removeprefix(_PREFIX))


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly DTensor-sharded) parameter or value, detached: an all-gather under FSDP2,
    so every rank must call it for the same tensor."""
    data = param.detach()
    return data.full_tensor() if hasattr(data, "full_tensor") else data


def _policy_lora_params(module: nn.Module, prefix: str) -> list[tuple[str, torch.Tensor]]:
    return [(f"{prefix}{n}", p) for n, p in module.named_parameters() if is_policy_lora(f"{prefix}{n}")]


def _groups(model: nn.Module) -> list[list[tuple[str, torch.Tensor]]]:
    """The policy's LoRA parameters grouped by decoder layer, plus one group for any outside the layers."""
    by_layer: dict[int, list] = {}
    rest = []
    for name, param in model.named_parameters():
        if not is_policy_lora(name):
            continue
        m = _LAYER.search(name)
        (by_layer.setdefault(int(m.group(1)), []) if m else rest).append((name, param))
    groups = [by_layer[i] for i in sorted(by_layer)]
    return groups + ([rest] if rest else [])


def gather_lora(model: nn.Module, layered: bool) -> dict[str, torch.Tensor]:
    """Full LoRA tensors keyed by PEFT's saved names, in host memory (on every rank)."""
    groups = _groups(model)
    out: dict[str, torch.Tensor] = {}
    if layered:
        for group in groups:
            on_device = {peft_name(n): full_tensor(p) for n, p in group}
            out.update({k: v.to("cpu", copy=True) for k, v in on_device.items()})
            del on_device  # release this layer's gathered copies before the next layer's gather
        return out
    on_device = {peft_name(n): full_tensor(p) for group in groups for n, p in group}
    return {k: v.to("cpu", copy=True) for k, v in on_device.items()}


def _hf_name(name: str) -> str:
    """`peft.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight` -> `model.layers.0.self_attn.q_proj.weight`."""
    name = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def iter_merged_layers(model: nn.Module, out_dtype: torch.dtype) -> Iterator[dict[str, torch.Tensor]]:
    """Yield, one decoder layer at a time, every weight of that layer under its HF name, with W + scaling·B·A for
    the LoRA-wrapped linears; then the weights outside the layers (embeddings, final norm, lm_head).

    All weights travel, not only the merged ones: vLLM's CPU `reload_weights` re-initialises the modules it
    reloads, and weights missing from the folder came back as garbage (NaN logits) in our measurements.
    The product is taken in float32 and cast once to `out_dtype` (the engine's dtype). Host tensors.
    """
    from peft.tuners.lora import LoraLayer

    from stages.train.sync_format import merge_lora_weight

    lora_modules = {f"{_hf_name(n)}.weight": m for n, m in model.named_modules()
                    if isinstance(m, LoraLayer) and POLICY in m.lora_A}
    by_layer: dict[int, list] = {}
    rest = []
    for name, param in model.named_parameters():
        if ".lora_" in name or name.startswith("value_head."):
            continue  # adapters (policy, critic) and the value head are not part of the served model
        m = _LAYER.search(name)
        (by_layer.setdefault(int(m.group(1)), []) if m else rest).append((_hf_name(name), param))
    for group in [by_layer[i] for i in sorted(by_layer)] + [rest]:
        out = {}
        for hf, param in group:
            weight = full_tensor(param).float()
            module = lora_modules.get(hf)
            if module is not None:
                weight = merge_lora_weight(weight, full_tensor(module.lora_A[POLICY].weight),
                                           full_tensor(module.lora_B[POLICY].weight), module.scaling[POLICY])
            out[hf] = weight.to("cpu", out_dtype)
        yield out
