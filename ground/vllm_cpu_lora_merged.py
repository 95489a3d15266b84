"""Per-slot merged weights: a LoRA layer whose whole batch uses ONE adapter runs as one GEMM, at base speed.

The segmented ops (ground/vllm_cpu_lora.py) cost what a LoRA must: one base GEMM plus two thin products per
layer. On CPU the thin products are not free (small GEMMs, casts, Python per layer: 1.4-1.8x the base
linear's time measured per layer), so a rollout with one adapter ran at ~0.7x the merged model's speed. When
every token of a forward uses the same adapter slot (a rollout; a serving batch of one adapter) the layer can
instead run x @ (W + B A)^T: the merged weight of that slot, built once and kept.

- Built lazily, on the first single-slot forward after the slot's weights were written, through the same CPU
  GEMM dispatch vLLM gives the base layer (oneDNN prepack, sgl kernel or torch), so it runs at the base's speed.
- Dropped whenever vLLM writes the slot (reset_lora / set_lora of the LoRA linear layers: every adapter
  (re)load goes through them), and all of a layer's merged weights are dropped when its base weights change
  (merged-mode training reloads them: the base kernel object vLLM dispatches to is then a new one).
- Bounded: at most LORA_PIPELINE_CPU_LORA_MERGED_SLOTS slots per layer (default 1; 0 turns this path off),
  least recently used dropped first. Memory: one merged copy of each LoRA linear layer's weight per cached
  slot, plus one unpacked copy of its base weight (vLLM's CPU dispatch keeps only a prepacked one, read back
  once through an identity product, which is exact: each output is one product with 1.0).
- Mixed batches and batches with no-adapter tokens take the segmented path, as do layers this cannot merge
  (quantized, tensor-parallel, or called with rows that are not this forward's tokens).

Installed by ground/vllm_cpu_lora.register(), behind the same version gate and off-switch. Imports nothing of ours.
"""

from __future__ import annotations

import logging
import os
import types
from collections import OrderedDict

import torch

log = logging.getLogger(__name__)

SLOTS_ENV = "LORA_PIPELINE_CPU_LORA_MERGED_SLOTS"
DEFAULT_SLOTS = 1
_LAYERS_MODULE = "vllm.lora.layers.base_linear"

# counters the tests and benchmarks read: forwards that took the merged path, and merged weights built
stats = {"merged_forwards": 0, "merges": 0}
_settings = {"slots": DEFAULT_SLOTS}
_ORIGINAL_METHODS: dict = {}  # (class, name) -> vLLM's own method, saved by install()


def slots_from_environment() -> int:
    raw = os.environ.get(SLOTS_ENV, str(DEFAULT_SLOTS)).strip()
    try:
        slots = int(raw)
    except ValueError:
        slots = -1
    if slots < 0:
        raise ValueError(f"{SLOTS_ENV}={raw!r} (environment) is not a whole number >= 0: set it to how many "
                         f"adapter slots per layer keep merged weights (default {DEFAULT_SLOTS}; 0 turns the "
                         "merged fast path off)")
    return slots


# ---------------------------------------------------------------- when a forward can run merged

def _single_slot(layer, token_count: int):
    """The adapter slot every token of this forward uses, or None (mixed, no-adapter tokens, unknown rows)."""
    known_count, groups = getattr(layer.punica_wrapper, "_segmented_groups", (None, None))
    if known_count != token_count or len(groups) != 1:
        return None
    slot, rows = groups[0]
    if not isinstance(rows, slice) or rows.start != 0 or rows.stop != token_count:
        return None  # some rows carry no adapter
    return slot


def _mergeable(layer) -> bool:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    base = layer.base_layer
    return (layer.tp_size == 1 and isinstance(base.quant_method, UnquantizedLinearMethod)
            and hasattr(base, "cpu_linear"))


# ---------------------------------------------------------------- building and caching merged weights

def _dispatched(weight: torch.Tensor):
    """A GEMM callable for `weight`, chosen and prepacked by vLLM's own CPU dispatch (as for the base layer)."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    holder = types.SimpleNamespace(weight=weight)
    dispatch_cpu_unquantized_gemm(holder, remove_weight=True)
    kernel, kept = holder.cpu_linear, holder.weight  # kept: empty when the kernel holds its own packed copy
    return lambda x, bias: kernel(x, kept, bias)


def unpacked_weight(base_layer) -> torch.Tensor:
    """The base layer's [out, in] weight, read back from vLLM's prepacked CPU kernel when it dropped the tensor."""
    weight = base_layer.weight
    if weight.numel():
        return weight.detach().clone()
    in_features = base_layer.input_size_per_partition
    eye = torch.eye(in_features, dtype=weight.dtype)
    # eye @ W^T = W^T, exactly: every output element is a single product with 1.0
    return base_layer.cpu_linear(eye, weight, None).to(dtype=weight.dtype).t().contiguous()


def _layer_cache(layer) -> dict:
    """Per layer: the base kernel the cache was built against, the unpacked base weight, merged slots (LRU)."""
    kernel = layer.base_layer.cpu_linear
    cache = layer.__dict__.get("_merged_slot_cache")
    if cache is None or cache["base_kernel"] is not kernel:  # first use, or the base weights were reloaded
        cache = {"base_kernel": kernel, "base_weight": None, "slots": OrderedDict()}
        layer.__dict__["_merged_slot_cache"] = cache
    return cache


def merged_weight(layer, slot: int) -> torch.Tensor:
    """W + B_j A_j per output slice j, for one slot, in float32 then rounded once to the base dtype."""
    cache = _layer_cache(layer)
    if cache["base_weight"] is None:
        cache["base_weight"] = unpacked_weight(layer.base_layer)
    base = cache["base_weight"]
    merged = base.to(dtype=torch.float32, copy=True)  # never the cached base itself (a float32 model)
    offset = 0
    for lora_a, lora_b, size in zip(layer.lora_a_stacked, layer.lora_b_stacked, layer.output_slices):
        a, b = lora_a[slot, 0].float(), lora_b[slot, 0, :size].float()
        merged[offset:offset + size].addmm_(b, a)  # vLLM calls add_lora_linear with scale 1.0: B holds the scaling
        offset += size
    return merged.to(dtype=base.dtype)


def _merged_linear(layer, slot: int):
    cache = _layer_cache(layer)
    slots = cache["slots"]
    if slot in slots:
        slots.move_to_end(slot)
        return slots[slot]
    while len(slots) >= _settings["slots"]:
        slots.popitem(last=False)
    slots[slot] = _dispatched(merged_weight(layer, slot))
    stats["merges"] += 1
    return slots[slot]


def forget_slot(layer, index: int) -> None:
    cache = layer.__dict__.get("_merged_slot_cache")
    if cache is not None:
        cache["slots"].pop(index, None)


# ---------------------------------------------------------------- the patched methods

def _apply_sync(self, x, bias=None):
    """BaseLinearLayerWithLoRA._apply_sync: one GEMM with the slot's merged weight when the batch allows it."""
    if _settings["slots"] > 0 and x.ndim == 2 and _mergeable(self):
        slot = _single_slot(self, x.shape[0])
        if slot is not None:
            stats["merged_forwards"] += 1
            return _merged_linear(self, slot)(x, bias)
    return _ORIGINAL_METHODS[(_base_class(), "_apply_sync")](self, x, bias)


def _forgetting(original):
    def write_slot(self, index, *args, **kwargs):
        forget_slot(self, index)  # before and after: no forward may see a half-written slot's merge
        try:
            return original(self, index, *args, **kwargs)
        finally:
            forget_slot(self, index)

    write_slot.__wrapped__ = original
    return write_slot


def _base_class():
    import importlib

    return importlib.import_module(_LAYERS_MODULE).BaseLinearLayerWithLoRA


def _linear_lora_classes():
    found, todo = [], [_base_class()]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def install() -> None:
    """Patch _apply_sync of vLLM's LoRA linear layers and wrap every set_lora / reset_lora they define."""
    slots = slots_from_environment()
    _settings["slots"] = slots
    if slots == 0 or _ORIGINAL_METHODS:
        return
    base = _base_class()
    _ORIGINAL_METHODS[(base, "_apply_sync")] = base._apply_sync
    base._apply_sync = _apply_sync
    for cls in _linear_lora_classes():
        for name in ("set_lora", "reset_lora"):
            if name in cls.__dict__:
                _ORIGINAL_METHODS[(cls, name)] = cls.__dict__[name]
                setattr(cls, name, _forgetting(cls.__dict__[name]))
    log.info("merged-weight fast path for single-adapter batches on (%s=%d slots per layer)", SLOTS_ENV, slots)


def uninstall() -> None:
    for (cls, name), original in _ORIGINAL_METHODS.items():
        setattr(cls, name, original)
    _ORIGINAL_METHODS.clear()
