"""The merged-weight fast path (ground/vllm_cpu_lora_merged.py) on vLLM's own LoRA linear layer classes.

The layers are real vLLM classes (MergedColumnParallelLinearWithLoRA for packed gate_up / qkv-like slices,
RowParallelLinearWithLoRA for one slice) around a base layer whose weight went through vLLM's CPU GEMM dispatch
(the weight tensor dropped, a prepacked kernel kept), with a real PunicaWrapperCPU for the token slots. Only the
constructor is skipped (it needs a distributed setup): the attributes it sets are set here.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA  # noqa: E402
from vllm.lora.layers.column_parallel_linear import MergedColumnParallelLinearWithLoRA  # noqa: E402
from vllm.lora.layers.row_parallel_linear import RowParallelLinearWithLoRA  # noqa: E402
from vllm.model_executor.layers.linear import (  # noqa: E402
    MergedColumnParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)

import ground.vllm_cpu_lora as segmented  # noqa: E402
import ground.vllm_cpu_lora_fused as fused  # noqa: E402
import ground.vllm_cpu_lora_merged as merged  # noqa: E402
from tests.ground.test_vllm_cpu_lora import close, cpu_wrapper_for, token_slots  # noqa: E402

ADAPTERS = 3  # slots 0..2 hold adapters; slot 3 stays empty (the last one, as in test_vllm_cpu_lora.py)


def base_layer(out_features: int, in_features: int, dtype, gen, bias: bool, packed: bool = False):
    base = object.__new__(MergedColumnParallelLinear if packed else RowParallelLinear)
    torch.nn.Module.__init__(base)
    base.weight = torch.nn.Parameter(torch.randn(out_features, in_features, generator=gen).to(dtype) / 8,
                                     requires_grad=False)
    base.bias = torch.nn.Parameter(torch.randn(out_features, generator=gen).to(dtype), requires_grad=False) \
        if bias else None
    base.input_size_per_partition = in_features
    base.quant_method = UnquantizedLinearMethod()
    base.quant_method.process_weights_after_loading(base)  # vLLM's CPU dispatch: prepacks, drops the weight
    return base


def lora_layer(out_slices, in_features: int, rank: int, max_rank: int, dtype, gen, bias: bool = False):
    cls = RowParallelLinearWithLoRA if len(out_slices) == 1 else MergedColumnParallelLinearWithLoRA
    layer = object.__new__(cls)
    torch.nn.Module.__init__(layer)
    layer.base_layer = base_layer(sum(out_slices), in_features, dtype, gen, bias, packed=len(out_slices) > 1)
    layer.tp_size, layer.tp_rank, layer.n_slices = 1, 0, len(out_slices)
    layer.output_slices = tuple(out_slices)
    layer._enable_aux_cuda_stream = False
    layer.lora_a_stacked = tuple(torch.zeros(ADAPTERS + 1, 1, max_rank, in_features, dtype=dtype)
                                 for _ in out_slices)
    layer.lora_b_stacked = tuple(torch.zeros(ADAPTERS + 1, 1, size, max_rank, dtype=dtype) for size in out_slices)
    for slot in range(ADAPTERS):
        set_random_adapter(layer, slot, rank, gen)
    return layer


def set_random_adapter(layer, slot: int, rank: int, gen) -> None:
    """Through the layer's own set_lora, as vLLM's model manager loads an adapter into a slot."""
    in_features = layer.lora_a_stacked[0].shape[-1]
    dtype = layer.lora_a_stacked[0].dtype
    a = [torch.randn(rank, in_features, generator=gen).to(dtype) / 4 for _ in layer.output_slices]
    b = [torch.randn(size, rank, generator=gen).to(dtype) / 4 for size in layer.output_slices]
    if len(a) == 1:
        layer.set_lora(slot, a[0], b[0])
    else:
        layer.set_lora(slot, a, b)


@pytest.fixture
def installed(monkeypatch):
    """The segmented ops and the merged path installed (one slot per layer unless a test sets more)."""
    monkeypatch.delenv(merged.SLOTS_ENV, raising=False)
    was_patched = segmented._state["patched"]
    segmented.uninstall()
    segmented.install()
    merged.install()
    yield
    segmented.uninstall()
    if was_patched:
        segmented.install()
        merged.install()


def vllms_own_apply(layer, x, bias):
    """vLLM's _apply_sync: base GEMM, then the wrapper's add_lora_linear (the segmented one, proven equal to
    upstream in test_vllm_cpu_lora.py)."""
    return merged._ORIGINAL_METHODS[(BaseLinearLayerWithLoRA, "_apply_sync")](layer, x, bias)


def forward(layer, slots, x, prefill: bool):
    layer.punica_wrapper = cpu_wrapper_for(slots, ADAPTERS, prefill)
    fused._remember_token_groups(layer.punica_wrapper)  # what the patched update_metadata adds
    bias = layer.base_layer.bias
    return layer.apply(x, bias), vllms_own_apply(layer, x, bias)


LAYERS = [  # (output slices, in features, rank, max rank, dtype, bias)
    ((96, 32, 32), 64, 16, 16, torch.bfloat16, False),  # qkv-like
    ((150, 150), 48, 8, 16, torch.bfloat16, True),  # gate_up, rank below the engine's max rank
    ((40,), 120, 32, 32, torch.float32, False),  # o_proj / down_proj
    ((72, 72), 96, 4, 8, torch.float32, True),
]


@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
@pytest.mark.parametrize("case", range(len(LAYERS)))
def test_single_adapter_batch_runs_merged_and_equals_the_segmented_path(case, prefill, installed):
    out_slices, in_features, rank, max_rank, dtype, bias = LAYERS[case]
    gen = torch.Generator().manual_seed(case)
    layer = lora_layer(out_slices, in_features, rank, max_rank, dtype, gen, bias)
    for slot in (1, 0, 1):  # one cached slot per layer by default: slot 1 is merged again the third time
        tokens = int(torch.randint(1, 70, (1,), generator=gen))
        x = torch.randn(tokens, in_features, generator=gen).to(dtype)
        before = dict(merged.stats)
        actual, expected = forward(layer, torch.full((tokens,), slot), x, prefill)
        assert merged.stats["merged_forwards"] == before["merged_forwards"] + 1
        close(actual, expected, dtype)
        # and against the arithmetic itself, in float64
        reference = x.double() @ merged.unpacked_weight(layer.base_layer).double().t()
        offset = 0
        for a, b, size in zip(layer.lora_a_stacked, layer.lora_b_stacked, out_slices):
            reference[:, offset:offset + size] += x.double() @ a[slot, 0].double().t() @ b[slot, 0].double().t()
            offset += size
        if bias:
            reference += layer.base_layer.bias.double()
        close(actual, reference.to(dtype), dtype)


@pytest.mark.parametrize("mix", ["one_adapter_some_none", "interleaved", "interleaved_some_none", "all_none"])
def test_mixed_batches_keep_the_segmented_path(mix, installed):
    gen = torch.Generator().manual_seed(7)
    layer = lora_layer((64, 64), 32, 8, 8, torch.bfloat16, gen)
    slots = token_slots(mix, 40, ADAPTERS, gen)
    x = torch.randn(40, 32, generator=gen).bfloat16()
    before = merged.stats["merged_forwards"]
    actual, expected = forward(layer, slots, x, prefill=False)
    assert merged.stats["merged_forwards"] == before
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_an_adapter_re_set_in_the_same_slot_changes_the_output(installed):
    """No stale merged weights: set_lora on a slot whose merge is cached drops it; the next batch sees the new
    adapter."""
    gen = torch.Generator().manual_seed(3)
    layer = lora_layer((80, 80), 40, 8, 8, torch.float32, gen)
    x = torch.randn(16, 40, generator=gen)
    slots = torch.zeros(16, dtype=torch.long)
    first, _ = forward(layer, slots, x, prefill=False)
    set_random_adapter(layer, 0, 8, gen)  # a new adapter (or a training step's update) in slot 0
    second, expected = forward(layer, slots, x, prefill=False)
    assert not torch.allclose(first, second)
    close(second, expected, torch.float32)
    layer.reset_lora(0)  # slot emptied: the base output, not the old merge
    third, _ = forward(layer, slots, x, prefill=False)
    close(third, layer.base_layer.cpu_linear(x, layer.base_layer.weight, None), torch.float32)


def test_reloaded_base_weights_drop_every_merge(installed):
    """Merged-mode training reloads the base weights (a new dispatched kernel): no merge of the old base is used."""
    gen = torch.Generator().manual_seed(4)
    layer = lora_layer((48,), 24, 8, 8, torch.float32, gen)
    x = torch.randn(8, 24, generator=gen)
    slots = torch.ones(8, dtype=torch.long)
    first, _ = forward(layer, slots, x, prefill=True)
    layer.base_layer = base_layer(48, 24, torch.float32, gen, bias=False)
    second, expected = forward(layer, slots, x, prefill=True)
    assert not torch.allclose(first, second)
    close(second, expected, torch.float32)


@pytest.mark.parametrize("cached_slots,expected_merges", [(1, 4), (2, 2)])
def test_cached_slots_are_bounded_least_recently_used_first(cached_slots, expected_merges, installed, monkeypatch):
    monkeypatch.setitem(merged._settings, "slots", cached_slots)
    gen = torch.Generator().manual_seed(5)
    layer = lora_layer((32,), 16, 4, 4, torch.float32, gen)
    x = torch.randn(4, 16, generator=gen)
    before = merged.stats["merges"]
    for slot in (0, 1, 0, 1):
        forward(layer, torch.full((4,), slot), x, prefill=False)
    assert merged.stats["merges"] - before == expected_merges
    assert len(layer._merged_slot_cache["slots"]) == cached_slots


def test_zero_slots_turns_the_fast_path_off(installed, monkeypatch):
    monkeypatch.setitem(merged._settings, "slots", 0)
    gen = torch.Generator().manual_seed(6)
    layer = lora_layer((32,), 16, 4, 4, torch.float32, gen)
    before = merged.stats["merged_forwards"]
    forward(layer, torch.zeros(4, dtype=torch.long), torch.randn(4, 16, generator=gen), prefill=False)
    assert merged.stats["merged_forwards"] == before


@pytest.mark.parametrize("raw", ["-1", "two", "1.5"])
def test_a_bad_slot_count_names_the_variable_and_the_fix(raw, monkeypatch):
    monkeypatch.setenv(merged.SLOTS_ENV, raw)
    with pytest.raises(ValueError, match=f"{merged.SLOTS_ENV}={raw!r}.*0 turns the merged fast path off"):
        merged.slots_from_environment()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_base_weight_reads_back_exactly_from_the_prepacked_kernel(dtype):
    gen = torch.Generator().manual_seed(8)
    original = torch.randn(200, 96, generator=gen).to(dtype)
    base = torch.nn.Module()
    base.weight = torch.nn.Parameter(original.clone(), requires_grad=False)
    base.input_size_per_partition = 96
    base.quant_method = UnquantizedLinearMethod()
    base.quant_method.process_weights_after_loading(base)
    assert torch.equal(merged.unpacked_weight(base), original)
