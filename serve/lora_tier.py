"""The host-memory adapter tier: how many adapters vLLM keeps loaded beside its LoRA slots (`max_cpu_loras`).

vLLM holds two tiers of adapters: `max_loras` slots that a batch can use, and an LRU cache of `max_cpu_loras`
adapters already read and converted (vLLM's default: as many as slots). An adapter that falls out of the cache
is read from disk again on its next request, so with many adapters and few slots every miss is a disk read,
a safetensors parse and a dtype conversion. Sizing the cache to a memory budget turns a miss into a copy.

What one adapter costs in that cache (vLLM 0.32, `vllm/lora/lora_model.py` `from_lora_tensors`): each LoRA
matrix is cast to the LoRA dtype (the served model's dtype unless set otherwise) and kept at the adapter's own
rank; padding to `max_lora_rank` happens only when it is copied into a slot. So an adapter costs its parameter
count (the registry records it at publish) times the serving dtype's size. The tier is sized for the largest
adapter the registry holds for the served base, so that any mix of cached adapters stays within the budget.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ground.model_files import stored_dtype

log = logging.getLogger(__name__)

# Default budget: on a 24 GiB machine that runs a few engines at once, 1 GiB holds about a thousand rank-8
# q/v adapters of a 135M model (0.9 MiB each in bf16) or ~50 rank-16 all-linear ones (19.6 MB each).
DEFAULT_LORA_CACHE_GIB = 1.0
# vLLM's LRU cache allocates nothing up front, but a count in the millions (a tiny test adapter is a few KiB)
# says nothing useful and hides a mistake in a log line; beyond this many, the budget stops mattering.
MAX_CPU_LORAS_CAP = 1024

_DTYPE_BYTES = {"float32": 4, "float": 4, "fp32": 4, "float16": 2, "half": 2, "fp16": 2, "bfloat16": 2,
                "bf16": 2, "float64": 8, "double": 8}


def max_cpu_loras_for(budget_bytes: int, per_adapter_bytes: int, max_loras: int, cap: int = MAX_CPU_LORAS_CAP) -> int:
    """How many adapters fit in `budget_bytes` at `per_adapter_bytes` each, never fewer than `max_loras` (vLLM
    refuses a cache smaller than its slots) and at most `cap` (or `max_loras`, if that is larger).

    A per-adapter size of 0 or less (nothing known to size against) gives `cap`.
    """
    if max_loras < 1:
        raise ValueError(f"max_loras must be at least 1, got {max_loras}")
    if budget_bytes < 0:
        raise ValueError(f"the adapter cache budget must not be negative, got {budget_bytes} bytes")
    fits = cap if per_adapter_bytes <= 0 else budget_bytes // per_adapter_bytes
    return max(max_loras, min(fits, cap))


def dtype_bytes(dtype: str, base_config: dict) -> int:
    """Bytes per element at the serving dtype; `auto` is the dtype the base's config.json names, as vLLM reads it
    (`ground.model_files.stored_dtype`)."""
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        name = stored_dtype(base_config)
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r} (known: {', '.join(sorted(_DTYPE_BYTES))})")
    return _DTYPE_BYTES[name]


def worst_case_parameters(base_shapes: dict[str, list[int]], rank: int) -> int:
    """LoRA parameters of an adapter of `rank` on every linear layer of the base (each [out, in] weight inside
    the decoder layers costs rank * (in + out)): the size to plan for when the registry holds no adapter yet."""
    return sum(rank * (shape[0] + shape[1]) for name, shape in base_shapes.items()
               if len(shape) == 2 and ".layers." in name and name.endswith(".weight"))


@dataclass(frozen=True)
class TierPlan:
    """The chosen `max_cpu_loras` and the figures it came from (for the server's log line)."""

    max_cpu_loras: int
    budget_bytes: int
    per_adapter_bytes: int
    adapters_sized: int  # registry versions on the served base that were measured
    reason: str

    def describe(self) -> str:
        return f"max_cpu_loras={self.max_cpu_loras} ({self.reason})"


def plan_tier(registry, base_dir: Path, base_fingerprint: str, dtype: str, max_loras: int, max_lora_rank: int,
              budget_gib: float, cap: int = MAX_CPU_LORAS_CAP) -> TierPlan:
    """Size the host-memory tier for the registry's adapters on this base (versions recorded with another base's
    fingerprint are never served, so they do not count; versions without one are served, so they do)."""
    from ground.errors import StageError

    if budget_gib < 0:
        raise StageError(f"The adapter cache budget is {budget_gib} GiB (--lora-cache-gib / serve.lora_cache_gib); "
                         "it must be 0 or more (0 keeps only --max-loras adapters loaded).")
    config = json.loads((Path(base_dir) / "config.json").read_text())
    try:
        width = dtype_bytes(dtype, config)
    except ValueError as exc:
        raise StageError(f"Cannot size the adapter cache for --dtype {dtype!r}: {exc}. Pass one of auto, float32, "
                         "bfloat16, float16.") from None
    budget = int(budget_gib * (1 << 30))
    sizes = []
    for name in registry.list_adapters():
        for version in registry.list_versions(name):
            if version.base_fingerprint not in (None, base_fingerprint):
                continue
            params = version.metadata.get("num_parameters")
            if params:
                sizes.append(int(params) * width)
    if sizes:
        per_adapter = max(sizes)
        source = f"largest of {len(sizes)} registry adapter(s) on this base: {per_adapter / (1 << 20):.2f} MiB"
    else:
        from registry.validate import base_shapes

        per_adapter = worst_case_parameters(base_shapes(Path(base_dir)), max_lora_rank) * width
        source = (f"no registry adapter on this base yet; a rank-{max_lora_rank} adapter on every linear layer: "
                  f"{per_adapter / (1 << 20):.2f} MiB")
    chosen = max_cpu_loras_for(budget, per_adapter, max_loras, cap)
    fits = budget // per_adapter if per_adapter > 0 else cap
    limit = ("the budget" if max_loras <= fits <= cap else f"capped at {cap}" if fits > cap
             else f"raised to max_loras={max_loras}")
    reason = (f"adapter cache budget {budget_gib:g} GiB / {source} at {width} bytes per parameter "
              f"= {fits} adapter(s); {limit}")
    return TierPlan(max_cpu_loras=chosen, budget_bytes=budget, per_adapter_bytes=per_adapter,
                    adapters_sized=len(sizes), reason=reason)


def choose_max_cpu_loras(registry, base_dir: Path, base_fingerprint: str, dtype: str, max_loras: int,
                         max_lora_rank: int, max_cpu_loras: int | None, budget_gib: float) -> tuple[int, str]:
    """The tier both serving modes use: an explicit `max_cpu_loras` (never below `max_loras`, which vLLM refuses),
    else the plan for `budget_gib`. Returns (max_cpu_loras, the line that says how it was chosen)."""
    if max_cpu_loras is not None:
        chosen = max(max_cpu_loras, max_loras)
        return chosen, f"max_cpu_loras={chosen} (set explicitly; never below max_loras)"
    plan = plan_tier(registry, base_dir, base_fingerprint, dtype, max_loras, max_lora_rank, budget_gib)
    return plan.max_cpu_loras, plan.describe()
