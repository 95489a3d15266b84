"""The segmented CPU LoRA ops (ground/vllm_cpu_lora.py) against vLLM's own torch ops, called side by side.

Random shapes, ranks, packed output slices, mixes of adapters with no-adapter (-1) tokens, decode (one slot
per token) and prefill (vLLM's run metadata), add_inputs on and off. For the comparison the stacked weights'
last slot is left empty (zeros): upstream, a -1 token indexes the last slot, so only then do the two agree on
no-adapter tokens; the test after that pins down the deliberate difference when the last slot is occupied.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from vllm.lora.ops.torch_ops import lora_ops as upstream  # noqa: E402
from vllm.lora.punica_wrapper.utils import compute_meta  # noqa: E402

import ground.vllm_cpu_lora as segmented  # noqa: E402
import ground.vllm_cpu_lora_fused as fused  # noqa: E402

MIXES = ["one_adapter", "one_adapter_some_none", "interleaved", "interleaved_some_none", "all_none", "sorted_runs"]


def token_slots(mix: str, tokens: int, adapters: int, gen) -> torch.Tensor:
    """One adapter slot per token (slot `adapters` stays empty: it is the last one, see the module docstring)."""
    if mix == "one_adapter":
        return torch.full((tokens,), adapters - 1)
    if mix == "one_adapter_some_none":
        slots = torch.full((tokens,), 0)
        slots[torch.rand(tokens, generator=gen) < 0.3] = -1
        return slots
    if mix == "interleaved":
        return torch.randint(0, adapters, (tokens,), generator=gen)
    if mix == "interleaved_some_none":
        return torch.randint(-1, adapters, (tokens,), generator=gen)
    if mix == "all_none":
        return torch.full((tokens,), -1)
    # prefill-like: sequences of random lengths, each with one slot (or none)
    slots, filled = [], 0
    while filled < tokens:
        length = min(int(torch.randint(1, 9, (1,), generator=gen)), tokens - filled)
        slots += [int(torch.randint(-1, adapters, (1,), generator=gen))] * length
        filled += length
    return torch.tensor(slots)


def stacked(adapters: int, rows: int, cols: int, dtype, gen, four_d: bool = True) -> torch.Tensor:
    """[adapters + 1 slots, 1, rows, cols] like vLLM's lora_a/b_stacked; the last slot is empty (zeros)."""
    weights = torch.randn(adapters + 1, rows, cols, generator=gen).to(dtype)
    weights[-1] = 0
    return weights.unsqueeze(1) if four_d else weights


def prefill_args(slots: torch.Tensor) -> tuple:
    # exactly what vLLM's CPU punica wrapper passes to the sgmv ops as `*self.prefill_metadata`
    starts, lengths, run_slots, batches, max_length, token_nums, _ = compute_meta(slots)
    return starts, lengths, run_slots, batches, max_length, token_nums


def close(actual, expected, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-4)
    else:  # bf16 output: one rounding step apart at most
        torch.testing.assert_close(actual.float(), expected.float(), rtol=2e-2, atol=2e-2 * expected.abs().max().item())


CASES = [(seed, mix) for seed in range(3) for mix in MIXES]


@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
@pytest.mark.parametrize("seed,mix", CASES)
def test_shrink_equals_upstream(seed, mix, prefill):
    gen = torch.Generator().manual_seed(seed)
    tokens = int(torch.randint(1, 70, (1,), generator=gen))
    rank, width, adapters = [8, 16, 32][seed], int(torch.randint(8, 200, (1,), generator=gen)), 3 + seed
    dtype = [torch.float32, torch.bfloat16, torch.bfloat16][seed]
    x = torch.randn(tokens, width, generator=gen).to(dtype)
    lora_a = stacked(adapters, rank, width, dtype, gen)
    slots = token_slots(mix, tokens, adapters, gen)
    # the wrapper's buffer is float32; pre-fill with garbage: shrink assigns, it must not add
    expected, actual = torch.full((tokens, rank), 7.0), torch.full((tokens, rank), 7.0)
    if prefill:
        upstream.sgmv_shrink(x, lora_a, expected, *prefill_args(slots), 0.5)
        segmented.sgmv_shrink(x, lora_a, actual, *prefill_args(slots), 0.5)
    else:
        upstream.bgmv_shrink(x, lora_a, expected, slots, 0.5)
        segmented.bgmv_shrink(x, lora_a, actual, slots, 0.5)
    # a bf16 model's shrink is computed in bf16 (ground/vllm_cpu_lora.py says why): bf16 rounding apart
    close(actual, expected, dtype)


@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
@pytest.mark.parametrize("seed,mix", CASES)
def test_expand_equals_upstream(seed, mix, prefill, add_inputs):
    gen = torch.Generator().manual_seed(100 + seed)
    tokens = int(torch.randint(1, 70, (1,), generator=gen))
    rank, adapters = [8, 16, 64][seed], 2 + seed
    dtype = [torch.bfloat16, torch.float32, torch.bfloat16][seed]
    out_width = int(torch.randint(8, 300, (1,), generator=gen))
    # the adapter may be wider or narrower than the output (padding): only the common width is written
    adapter_width = out_width + [0, 5, -3][seed]
    h = torch.randn(tokens, rank, generator=gen)  # the shrink buffer: float32
    lora_b = stacked(adapters, adapter_width, rank, dtype, gen, four_d=seed != 1)
    slots = token_slots(mix, tokens, adapters, gen)
    start = torch.randn(tokens, out_width, generator=gen).to(dtype)
    expected, actual = start.clone(), start.clone()
    if prefill:
        upstream.sgmv_expand(h, lora_b, expected, *prefill_args(slots), add_inputs)
        segmented.sgmv_expand(h, lora_b, actual, *prefill_args(slots), add_inputs)
    else:
        upstream.bgmv_expand(h, lora_b, expected, slots, add_inputs)
        segmented.bgmv_expand(h, lora_b, actual, slots, add_inputs)
    close(actual, expected, dtype)


@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
@pytest.mark.parametrize("seed,mix", CASES)
def test_packed_linear_equals_upstream(seed, mix, prefill, add_inputs):
    """A packed layer (qkv: 3 slices, gate_up: 2) the way the CPU wrapper's add_lora_linear runs it: shrink per
    slice into float32 buffers, then expand_slice per slice at its offset of one output."""
    gen = torch.Generator().manual_seed(200 + seed)
    tokens = int(torch.randint(1, 50, (1,), generator=gen))
    rank, adapters, width = [16, 8, 32][seed], 4, int(torch.randint(16, 120, (1,), generator=gen))
    dtype = [torch.bfloat16, torch.float32, torch.bfloat16][seed]
    out_slices = [[96, 32, 32], [150, 150], [40, 24, 24]][seed]
    x = torch.randn(tokens, width, generator=gen).to(dtype)
    lora_as = [stacked(adapters, rank, width, dtype, gen) for _ in out_slices]
    lora_bs = [stacked(adapters, size, rank, dtype, gen) for size in out_slices]
    slots = token_slots(mix, tokens, adapters, gen)
    base = torch.randn(tokens, sum(out_slices), generator=gen).to(dtype)

    def run(ops) -> torch.Tensor:
        y = base.clone()
        buffers = [torch.zeros(tokens, rank) for _ in out_slices]
        offset = 0
        for lora_a, lora_b, buffer, size in zip(lora_as, lora_bs, buffers, out_slices):
            if prefill:
                ops.sgmv_shrink(x, lora_a, buffer, *prefill_args(slots), 2.0)
                ops.sgmv_expand_slice(buffer, lora_b, y, *prefill_args(slots), offset, size, add_inputs)
            else:
                ops.bgmv_shrink(x, lora_a, buffer, slots, 2.0)
                ops.bgmv_expand_slice(buffer, lora_b, y, slots, offset, size, add_inputs)
            offset += size
        return y

    close(run(segmented), run(upstream), dtype)


def cpu_wrapper_for(slots: torch.Tensor, adapters: int, prefill: bool):
    """A real PunicaWrapperCPU whose metadata vLLM's own update_metadata set for these token slots."""
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    tokens = max(128, len(slots))
    wrapper = PunicaWrapperCPU(max_num_batched_tokens=tokens, max_batches=tokens, device="cpu")
    lora_ids = tuple(int(s) + 1 for s in slots)  # adapter id k+1 sits in slot k; id 0 = no adapter
    mapping = LoRAMapping(lora_ids, lora_ids, is_prefill=prefill)
    PunicaWrapperBase.update_metadata(wrapper, mapping, list(range(1, adapters + 1)) + [None], adapters + 1,
                                      vocab_size=1000)
    return wrapper


@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
@pytest.mark.parametrize("seed,mix", CASES)
def test_fused_add_lora_linear_equals_upstream(seed, mix, prefill, restorable_wrapper):
    """The fused add_lora_linear (one shrink GEMM for all slices, tokens grouped once per forward) against vLLM's
    own add_lora_linear running vLLM's own ops, on packed (qkv, gate_up) and single-slice layers."""
    gen = torch.Generator().manual_seed(300 + seed)
    tokens = int(torch.randint(1, 64, (1,), generator=gen))
    rank, adapters, width = [16, 8, 32][seed], 3, int(torch.randint(16, 120, (1,), generator=gen))
    dtype = [torch.bfloat16, torch.float32, torch.bfloat16][seed]
    slots = token_slots(mix, tokens, adapters, gen)
    wrapper = cpu_wrapper_for(slots, adapters, prefill)
    upstream_add_lora_linear = fused.ORIGINAL_METHODS.get("add_lora_linear",
                                                               restorable_wrapper.PunicaWrapperCPU.add_lora_linear)
    fused._remember_token_groups(wrapper)  # what the patched update_metadata adds
    for out_slices in ([96, 32, 32], [150, 150], [40]):
        x = torch.randn(tokens, width, generator=gen).to(dtype)
        lora_as = tuple(stacked(adapters, rank, width, dtype, gen) for _ in out_slices)
        lora_bs = tuple(stacked(adapters, size, rank, dtype, gen) for size in out_slices)
        base = torch.randn(tokens, sum(out_slices), generator=gen).to(dtype)
        expected, actual = base.clone(), base.clone()
        upstream_add_lora_linear(wrapper, expected, x, lora_as, lora_bs, 1.0, tuple(out_slices))
        fused.add_lora_linear(wrapper, actual, x, lora_as, lora_bs, 1.0, tuple(out_slices))
        close(actual, expected, dtype)
        if mix != "all_none":
            assert not torch.equal(actual, base)  # the LoRA delta did land


def test_fused_add_lora_linear_falls_back_on_rows_it_was_not_told_about(restorable_wrapper):
    """Rows that are not this forward's tokens (no grouping for them): vLLM's own method runs, same result."""
    gen = torch.Generator().manual_seed(11)
    slots = torch.tensor([0, 0, 1, 1, -1])
    wrapper = cpu_wrapper_for(slots, 2, prefill=True)
    fused._remember_token_groups(wrapper)
    wrapper._segmented_groups = (99, wrapper._segmented_groups[1])  # stale: another forward's token count
    x = torch.randn(5, 24, generator=gen)
    lora_a, lora_b = (stacked(2, 8, 24, torch.float32, gen),), (stacked(2, 40, 8, torch.float32, gen),)
    expected, actual = torch.zeros(5, 40), torch.zeros(5, 40)
    restorable_wrapper.PunicaWrapperCPU.add_lora_linear(wrapper, expected, x, lora_a, lora_b, 1.0, (40,))
    fused.add_lora_linear(wrapper, actual, x, lora_a, lora_b, 1.0, (40,))
    torch.testing.assert_close(actual, expected)


LAYOUT_CASES = {"several": ([0, 2, 1, -1, 0, 1, 2, 2, -1, 0, 1, 0], 1),  # all-slot products
                "one": ([2] * 12, 0),  # one group: the per-group loop with its per-slot layouts
                "runs": ([0] * 150 + [2] * 150 + [-1] * 4, 0)}  # long runs: the loop


@pytest.mark.parametrize("case", LAYOUT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_layouts_equal_upstream_and_follow_in_place_writes(dtype, case, restorable_wrapper):
    """The products on cached layouts (all slots at once for interleaved tokens of 3 adapters and the base; per
    slot with a block-diagonal expand otherwise) equal vLLM's own method, and after vLLM writes a slot in place
    (as set_lora / reset_lora do) they are rebuilt: the next call equals vLLM's method on the new weights."""
    gen = torch.Generator().manual_seed(21)
    slot_list, all_slot_calls = LAYOUT_CASES[case]
    slots = torch.tensor(slot_list)
    wrapper = cpu_wrapper_for(slots, 3, prefill=False)
    fused._remember_token_groups(wrapper)
    upstream_add_lora_linear = fused.ORIGINAL_METHODS.get("add_lora_linear",
                                                               restorable_wrapper.PunicaWrapperCPU.add_lora_linear)
    out_slices = (48, 16, 16)
    x = torch.randn(len(slots), 40, generator=gen).to(dtype)
    lora_as = tuple(stacked(3, 8, 40, dtype, gen) for _ in out_slices)
    lora_bs = tuple(stacked(3, size, 8, dtype, gen) for size in out_slices)

    def both() -> tuple:
        expected, actual = torch.zeros(len(slots), 80, dtype=dtype), torch.zeros(len(slots), 80, dtype=dtype)
        upstream_add_lora_linear(wrapper, expected, x, lora_as, lora_bs, 1.0, out_slices)
        calls = fused.stats["all_slot_calls"]
        fused.add_lora_linear(wrapper, actual, x, lora_as, lora_bs, 1.0, out_slices)
        assert fused.stats["all_slot_calls"] == calls + all_slot_calls
        return actual, expected

    actual, expected = both()
    close(actual, expected, dtype)
    assert torch.all(actual[slots == -1] == 0)
    lora_bs[1][2, 0].copy_(torch.randn(16, 8, generator=gen).to(dtype))  # set_lora writes slot 2 of slice 1
    lora_as[0][0] = 0  # reset_lora zeroes slot 0
    rewritten, expected = both()
    close(rewritten, expected, dtype)
    assert not torch.equal(rewritten[slots == 2, 48:64], actual[slots == 2, 48:64])
    assert torch.all(rewritten[slots == 0, :48] == 0)


def test_a_few_long_runs_keep_the_per_group_loop(restorable_wrapper):
    """Prefill of 2 sequences of 200 tokens each: the thin products per group cost less than all slots'."""
    slots = torch.tensor([1] * 200 + [0] * 200)
    wrapper = cpu_wrapper_for(slots, 2, prefill=True)
    fused._remember_token_groups(wrapper)
    assert not fused._all_slot_products_pay(wrapper._segmented_groups[1], len(slots))
    wrapper = cpu_wrapper_for(torch.tensor([1] * 32 + [0] * 32), 2, prefill=True)  # 2 short runs: all slots pay
    fused._remember_token_groups(wrapper)
    assert fused._all_slot_products_pay(wrapper._segmented_groups[1], 64)


def test_no_adapter_tokens_get_no_delta_even_when_the_last_slot_is_occupied():
    """Upstream indexes slot -1 = the last slot; the segmented ops add nothing (assign zero) for -1 tokens."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 32, generator=gen)
    lora_a = torch.randn(3, 1, 8, 32, generator=gen)  # every slot occupied, the last one too
    lora_b = torch.randn(3, 1, 40, 8, generator=gen)
    slots = torch.tensor([0, -1, 2, -1, 1, 2])
    none = slots == -1

    h = torch.full((6, 8), 3.0)
    segmented.bgmv_shrink(x, lora_a, h, slots)
    assert torch.all(h[none] == 0)
    upstream_h = torch.zeros(6, 8)
    upstream.bgmv_shrink(x, lora_a, upstream_h, slots)
    assert not torch.all(upstream_h[none] == 0)  # the upstream quirk this module does not reproduce
    torch.testing.assert_close(h[~none], upstream_h[~none])

    y = torch.ones(6, 40)
    segmented.bgmv_expand(h, lora_b, y, slots, add_inputs=True)
    assert torch.all(y[none] == 1)
    y = torch.ones(6, 40)
    segmented.sgmv_expand_slice(h, lora_b, y, *prefill_args(slots), 0, 40, False)
    assert torch.all(y[none] == 0)


def test_weights_are_indexed_per_adapter_not_per_token():
    """The point of the module: no weight tensor is gathered with one index per token."""
    gathers = []

    class Watched(torch.Tensor):
        def __getitem__(self, index):
            if isinstance(index, torch.Tensor) and index.numel() > 1:
                gathers.append(index.numel())
            return super().__getitem__(index)

    gen = torch.Generator().manual_seed(9)
    x = torch.randn(64, 48, generator=gen)
    lora_a = torch.randn(4, 1, 16, 48, generator=gen).as_subclass(Watched)
    slots = torch.randint(-1, 4, (64,), generator=gen)
    segmented.bgmv_shrink(x, lora_a, torch.zeros(64, 16), slots)
    segmented.sgmv_shrink(x, lora_a, torch.zeros(64, 16), *prefill_args(slots), 1.0)
    assert gathers == []
    upstream.bgmv_shrink(x, lora_a, torch.zeros(64, 16), slots)
    assert gathers == [64]  # the watcher sees upstream's per-token gather


# ---------------------------------------------------------------- the plugin switch

@pytest.fixture
def restorable_wrapper(monkeypatch):
    """The CPU punica wrapper module with its op names restored after the test."""
    import vllm.lora.punica_wrapper.punica_cpu as wrapper_module

    for name in segmented.PATCHED_NAMES:
        monkeypatch.setattr(wrapper_module, name, getattr(upstream, name))
    for name, original in fused.ORIGINAL_METHODS.items():  # vLLM's own methods while the test runs
        monkeypatch.setattr(wrapper_module.PunicaWrapperCPU, name, original)
    monkeypatch.setitem(segmented._state, "patched", False)
    return wrapper_module


def test_plugin_is_installed_as_a_vllm_general_plugin():
    values = [e.value for e in entry_points(group="vllm.general_plugins")]
    assert "ground.vllm_cpu_lora:register" in values


def test_register_replaces_the_cpu_wrapper_ops(restorable_wrapper, monkeypatch):
    monkeypatch.delenv(segmented.ENV_SWITCH, raising=False)
    segmented.register()
    for name in segmented.PATCHED_NAMES:
        assert getattr(restorable_wrapper, name) is getattr(segmented, name)
    assert restorable_wrapper.PunicaWrapperCPU.add_lora_linear is fused.add_lora_linear
    assert restorable_wrapper.PunicaWrapperCPU.update_metadata is fused.update_metadata


def test_environment_variable_turns_it_off(restorable_wrapper, monkeypatch):
    monkeypatch.setenv(segmented.ENV_SWITCH, "0")
    segmented.register()
    assert restorable_wrapper.bgmv_shrink is upstream.bgmv_shrink
    assert restorable_wrapper.PunicaWrapperCPU.add_lora_linear is not fused.add_lora_linear


def test_untested_vllm_version_stays_off_with_one_log_line(restorable_wrapper, monkeypatch, caplog):
    import vllm

    monkeypatch.delenv(segmented.ENV_SWITCH, raising=False)
    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    with caplog.at_level(logging.INFO, logger=segmented.__name__):
        segmented.register()
    assert restorable_wrapper.sgmv_expand is upstream.sgmv_expand
    lines = [r.getMessage() for r in caplog.records if r.name == segmented.__name__]
    assert len(lines) == 1 and "0.99.0" in lines[0] and "0.32.0" in lines[0]
