"""The host-memory adapter tier's sizing (serve/lora_tier.py): pure arithmetic and a real local registry."""

from __future__ import annotations

import json

import pytest

from config.schema import ServeConfig
from ground.errors import StageError
from ground.model_files import check_safetensors
from registry import open_registry
from tests.synthetic_lora import write_lora
from serve.lora_tier import (DEFAULT_LORA_CACHE_GIB, MAX_CPU_LORAS_CAP, dtype_bytes, max_cpu_loras_for, plan_tier,
                             worst_case_parameters)

MIB = 1 << 20


def test_budget_divided_by_adapter_size_between_slots_and_cap():
    assert max_cpu_loras_for(100 * MIB, 1 * MIB, max_loras=8) == 100
    assert max_cpu_loras_for(100 * MIB, 3 * MIB, max_loras=8) == 33  # whole adapters only
    assert max_cpu_loras_for(10 * MIB, 3 * MIB, max_loras=8) == 8  # never below the slots
    assert max_cpu_loras_for(0, 3 * MIB, max_loras=4) == 4
    assert max_cpu_loras_for(1 << 40, 1024, max_loras=8) == MAX_CPU_LORAS_CAP
    assert max_cpu_loras_for(1 << 40, 1024, max_loras=8, cap=50) == 50
    assert max_cpu_loras_for(1 << 40, 1024, max_loras=64, cap=50) == 64  # the slots win over the cap
    assert max_cpu_loras_for(MIB, 0, max_loras=2) == MAX_CPU_LORAS_CAP  # nothing to size against
    with pytest.raises(ValueError):
        max_cpu_loras_for(MIB, MIB, max_loras=0)
    with pytest.raises(ValueError):
        max_cpu_loras_for(-1, MIB, max_loras=1)


def test_dtype_bytes_reads_auto_from_the_base_config():
    assert dtype_bytes("auto", {"torch_dtype": "bfloat16"}) == 2
    assert dtype_bytes("auto", {"dtype": "float32"}) == 4
    assert dtype_bytes("auto", {}) == 4
    assert dtype_bytes("float16", {"torch_dtype": "float32"}) == 2
    with pytest.raises(ValueError, match="int3"):
        dtype_bytes("int3", {})


def test_config_default_is_the_servers_default():
    assert ServeConfig().lora_cache_gib == DEFAULT_LORA_CACHE_GIB  # config cannot import serve: kept in step here


def _tensor_elements(adapter_dir) -> int:
    header = check_safetensors(adapter_dir / "adapter_model.safetensors")
    total = 0
    for key, meta in header.items():
        if key != "__metadata__":
            n = 1
            for d in meta["shape"]:
                n *= d
            total += n
    return total


def test_plan_sizes_for_the_largest_adapter_on_the_served_base(tmp_path, tiny_model_dir):
    from ground.model_files import fingerprint

    reg = open_registry(str(tmp_path / "registry"))
    small = write_lora(tmp_path / "small", rank=4, seed=1)
    big = write_lora(tmp_path / "big", rank=8, seed=2, targets=("q_proj", "v_proj", "o_proj"))
    reg.publish(small, "small", base_dir=tiny_model_dir)
    reg.publish(big, "big", base_dir=tiny_model_dir)
    # an adapter recorded for another base is never served by this server: it must not size the tier
    huge = write_lora(tmp_path / "huge", rank=64, seed=3, targets=("q_proj", "v_proj", "o_proj", "up_proj"))
    reg.publish(huge, "huge", base_fingerprint="0" * 64)
    base_fp = fingerprint(tiny_model_dir)
    width = 4  # the tiny model is float32
    per_adapter = _tensor_elements(big) * width
    assert per_adapter > _tensor_elements(small) * width

    budget_gib = 40.5 * per_adapter / (1 << 30)
    plan = plan_tier(reg, tiny_model_dir, base_fp, "auto", max_loras=4, max_lora_rank=8, budget_gib=budget_gib)
    assert (plan.max_cpu_loras, plan.per_adapter_bytes, plan.adapters_sized) == (40, per_adapter, 2)
    assert "the budget" in plan.describe() and "largest of 2" in plan.describe()
    # bf16 serving halves each adapter, so twice as many fit
    assert plan_tier(reg, tiny_model_dir, base_fp, "bfloat16", 4, 8, budget_gib).max_cpu_loras == 81
    raised = plan_tier(reg, tiny_model_dir, base_fp, "auto", max_loras=64, max_lora_rank=8, budget_gib=budget_gib)
    assert raised.max_cpu_loras == 64 and "raised to max_loras=64" in raised.reason
    with pytest.raises(StageError, match="--lora-cache-gib"):
        plan_tier(reg, tiny_model_dir, base_fp, "auto", 4, 8, -1.0)
    with pytest.raises(StageError, match="--dtype 'int3'"):
        plan_tier(reg, tiny_model_dir, base_fp, "int3", 4, 8, 1.0)


def test_plan_without_adapters_assumes_an_all_linear_adapter_at_max_rank(tmp_path, tiny_model_dir):
    from registry.validate import base_shapes

    reg = open_registry(str(tmp_path / "registry"))
    shapes = base_shapes(tiny_model_dir)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    layers = config["num_hidden_layers"]
    # q, k, v, o, gate, up, down in every layer of the tiny Llama (tests/tiny_model.py)
    expected = layers * 8 * sum(i + o for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128),
                                                   (128, 64)])
    assert worst_case_parameters(shapes, 8) == expected
    plan = plan_tier(reg, tiny_model_dir, "x", "auto", max_loras=2, max_lora_rank=8,
                     budget_gib=10 * expected * 4 / (1 << 30))
    assert plan.max_cpu_loras == 10 and plan.adapters_sized == 0 and "no registry adapter" in plan.reason
