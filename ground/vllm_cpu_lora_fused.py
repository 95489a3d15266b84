"""One fused call per LoRA linear layer for vLLM's CPU engine (part of the plugin in ground/vllm_cpu_lora.py).

The six ops of ground/vllm_cpu_lora.py replace vLLM's per-token weight copies, but vLLM's wrapper still runs,
per LoRA layer and forward, a float32 buffer per slice, one shrink and one expand call per slice and the token
grouping once per call. These methods of the CPU punica wrapper replace that: the tokens are grouped once per
forward (update_metadata), and add_lora_linear runs, per layer,
- for each adapter group: one shrink GEMM against the slot's A matrices of every slice (stacked) and one
  expand GEMM against its B matrices laid out block-diagonally, straight into the output;
- for a batch of several adapters (decode): all slots at once (see "many adapters in one batch" below).
Installed by ground/vllm_cpu_lora.install(), whose ops share the token grouping below; imports nothing of ours.
"""

from __future__ import annotations

import torch

CPU_WRAPPER_MODULE = "vllm.lora.punica_wrapper.punica_cpu"


# ---------------------------------------------------------------- grouping tokens by adapter slot

def groups_from_token_slots(token_slots):
    """[(slot, rows)] for one slot per token; rows is a slice when the slot's tokens are contiguous, else an
    index tensor. Slot -1 is left out. Also returns whether every row is covered by some group."""
    runs, run_lengths = torch.unique_consecutive(token_slots, return_counts=True)
    slots, lengths = runs.tolist(), run_lengths.tolist()
    if len(set(slots)) == len(slots):  # each slot in one contiguous run (the usual case: one adapter per batch)
        groups, start = [], 0
        for slot, length in zip(slots, lengths):
            if slot >= 0:
                groups.append((slot, slice(start, start + length)))
            start += length
        return groups, -1 not in slots
    # interleaved slots (many adapters decoding together): one stable sort, then contiguous ranges of it
    order = torch.argsort(token_slots, stable=True)
    sorted_slots, counts = torch.unique_consecutive(token_slots[order], return_counts=True)
    groups, start = [], 0
    for slot, count in zip(sorted_slots.tolist(), counts.tolist()):
        if slot >= 0:
            groups.append((slot, order[start:start + count]))
        start += count
    return groups, -1 not in slots


def slot_matrices(weights):
    # stacked LoRA weights are [slots, 1, out, in] (or [slots, out, in]); the upstream ops squeeze dim 1
    return weights.squeeze(1) if weights.dim() == 4 else weights



# ---------------------------------------------------------------- one adapter group at a time
#
# Why fused: with only the six ops, at the demo's decode shape (64 tokens, 4 LoRA layers x 30 decoder layers,
# 7 slices) the Python and dispatch work per slice, not the multiply-adds, was most of the LoRA time. Same
# arithmetic as the ops: shrink in the input's dtype when the weights share it, scaling in float32 (vLLM's
# buffer dtype), expand in the output's dtype, adding into the output. The per-slot layouts (A rows of all
# slices stacked; B block-diagonal) are cached on vLLM's stacked tensors, see _cached_layout.


def _remember_token_groups(wrapper) -> None:
    slots = wrapper.token_lora_indices
    groups, _ = groups_from_token_slots(slots)
    wrapper._segmented_groups = (slots.shape[0], groups)
    wrapper._slot_masks = {}


def update_metadata(self, *args, **kwargs):
    """PunicaWrapperCPU.update_metadata, then this forward's tokens grouped by adapter slot, once."""
    _original_method("update_metadata")(self, *args, **kwargs)
    _remember_token_groups(self)


def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None,
                    **kwargs):
    """PunicaWrapperCPU.add_lora_linear: y[:, slice j] += scale * x A_j^T B_j^T per token's slot, fused."""
    x = x.view(-1, x.shape[-1])
    y_2d = y.view(-1, y.shape[-1])
    token_count, groups = getattr(self, "_segmented_groups", (None, None))
    if buffer is not None or x.shape[0] != token_count or y_2d.shape[0] != token_count:
        # a caller-provided buffer, or rows that are not this forward's tokens: vLLM's method (with the ops above)
        return _original_method("add_lora_linear")(self, y, x, lora_a_stacked, lora_b_stacked, scale,
                                                   output_slices, buffer=buffer, **kwargs)
    if _all_slot_products_pay(groups, token_count):
        _add_all_slot_products(self, y_2d, x, lora_a_stacked, lora_b_stacked, scale, output_slices)
        return None
    width = sum(output_slices)
    for slot, rows in groups:
        a_rows = _cached_layout(lora_a_stacked, f"_lora_pipeline_a_slot{slot}", lora_a_stacked[0].dtype,
                                lambda: torch.cat([slot_matrices(a)[slot] for a in lora_a_stacked]))
        b_blocks = _cached_layout(lora_b_stacked, f"_lora_pipeline_b_slot{slot}", y_2d.dtype,
                                  lambda: _block_diagonal([slot_matrices(b)[slot] for b in lora_b_stacked],
                                                          output_slices, y_2d.dtype))
        x_rows = x[rows]
        if a_rows.dtype != x.dtype:  # upstream's float32 buffer arithmetic
            x_rows, a_rows = x_rows.float(), a_rows.float()
        shrunk = x_rows @ a_rows.t()
        if scale != 1.0:
            shrunk = shrunk.float().mul_(scale)
        shrunk = shrunk.to(dtype=y_2d.dtype)
        if isinstance(rows, slice):
            y_2d[rows, :width].addmm_(shrunk, b_blocks)
        else:  # scattered rows: gather, compute, scatter back (activations only, never weights)
            y_2d[rows, :width] = torch.addmm(y_2d[rows, :width], shrunk, b_blocks)
    return None


def _block_diagonal(b_matrices, output_slices, dtype):
    """[slices * rank, sum(out)]: slice j's B^T in rows j*rank.., columns of its output slice; zeros elsewhere.

    One expand GEMM for a packed layer (qkv, gate_up) instead of one per slice: the zero blocks add exact zeros,
    and at one slot they are a few KB (per decoder layer at 8-16 decode tokens: 0.80 ms against 1.07 ms with
    an expand per slice and the A matrices concatenated per call, base 0.54 ms)."""
    rank = b_matrices[0].shape[-1]
    blocks = torch.zeros(len(b_matrices) * rank, sum(output_slices), dtype=dtype)
    offset = 0
    for index, (b, size) in enumerate(zip(b_matrices, output_slices)):
        blocks[index * rank:(index + 1) * rank, offset:offset + size] = b[:size].t()
        offset += size
    return blocks


# ---------------------------------------------------------------- many adapters in one batch
#
# The loop above costs per adapter group and layer two GEMMs and casts, plus a gather and a scatter when the
# group's rows are scattered (decoding requests of several adapters). Measured per decoder layer (its 4 LoRA
# layers, SmolLM2 shapes, bf16, rank 16, one thread, before the block-diagonal expand), 16 decode tokens: base
# 0.62 ms, one group 1.14 ms, 8 interleaved groups 4.1 ms. With several groups it is cheaper to multiply every row by EVERY
# slot's A at once (one shrink GEMM against the stacked A rows of all slices and slots), zero what each row's
# own slot does not own (a 0/1 mask per row and slot, built once per forward), and expand with one GEMM per
# slice against all slots' B laid out [slots * rank, out]: 1.4 ms for those 16 tokens, whatever the number of
# groups. The thin products' multiply-adds grow by the slot count, so a few long contiguous groups (prefill)
# keep the loop: at 256 tokens in 2 runs the loop took 4.0 ms against 4.6 ms.
# The [slots * rank, ...] layouts are copies of vLLM's stacked tensors, cached on those tensors and rebuilt
# when vLLM writes them: every in-place write (set_lora, reset_lora) moves the tensor's version counter.

ROWS_PER_GROUP_FOR_LOOP = 128  # the loop is kept when the groups are contiguous and average this many rows or more
stats = {"all_slot_calls": 0}  # LoRA layer calls that took the all-slot products (tests and benchmarks read it)


def _all_slot_products_pay(groups, token_count: int) -> bool:
    if len(groups) < 2:
        return False
    scattered = any(not isinstance(rows, slice) for _, rows in groups)
    return scattered or len(groups) * ROWS_PER_GROUP_FOR_LOOP > token_count


def _cached_layout(tensors, name: str, dtype, build):
    """build() cached on tensors[0] until any of `tensors` is written in place (or asked in another dtype)."""
    try:
        key = (dtype,) + tuple(t._version for t in tensors)
    except RuntimeError:  # inference-mode tensors keep no version counter: nothing to cache against
        return build()
    cached = getattr(tensors[0], name, None)
    if cached is None or cached[0] != key:
        cached = (key, build())
        setattr(tensors[0], name, cached)
    return cached[1]


def _slot_mask(wrapper, token_count: int, slot_count: int, dtype):
    """[tokens, slots] with 1 where the token uses the slot (none for slot -1), built once per forward."""
    masks = wrapper.__dict__.setdefault("_slot_masks", {})  # emptied by update_metadata
    if (slot_count, dtype) not in masks:
        slots = wrapper.token_lora_indices[:token_count]
        mask = torch.zeros(token_count, slot_count, dtype=dtype)
        used = (slots >= 0).nonzero().squeeze(1)
        mask[used, slots[used]] = 1
        masks[(slot_count, dtype)] = mask
    return masks[(slot_count, dtype)]


def _add_all_slot_products(wrapper, y_2d, x, lora_a_stacked, lora_b_stacked, scale, output_slices) -> None:
    stats["all_slot_calls"] += 1
    slot_count, rank = slot_matrices(lora_a_stacked[0]).shape[:2]
    a_rows = _cached_layout(lora_a_stacked, "_lora_pipeline_a_rows", lora_a_stacked[0].dtype, lambda: torch.cat(
        [slot_matrices(a).reshape(slot_count * rank, -1) for a in lora_a_stacked]))
    x_2d = x
    if a_rows.dtype != x.dtype:  # upstream's float32 buffer arithmetic
        x_2d, a_rows = x.float(), a_rows.float()
    shrunk = x_2d @ a_rows.t()  # [tokens, slices * slots * rank]
    if scale != 1.0:
        shrunk = shrunk.float().mul_(scale)
    token_count = x.shape[0]
    mask = _slot_mask(wrapper, token_count, slot_count, y_2d.dtype)
    shrunk = shrunk.to(dtype=y_2d.dtype).view(token_count, len(lora_a_stacked), slot_count, rank)
    shrunk = (shrunk * mask.view(token_count, 1, slot_count, 1)).view(token_count, len(lora_a_stacked), -1)
    offset = 0
    for index, (lora_b, size) in enumerate(zip(lora_b_stacked, output_slices)):
        b_rows = _cached_layout((lora_b,), "_lora_pipeline_b_rows", y_2d.dtype, lambda b=lora_b: slot_matrices(b)
                                .transpose(1, 2).reshape(slot_count * rank, -1).to(dtype=y_2d.dtype))
        y_2d[:, offset:offset + size].addmm_(shrunk[:, index], b_rows)
        offset += size


PATCHED_METHODS = ("update_metadata", "add_lora_linear")
ORIGINAL_METHODS: dict = {}  # vLLM's own, saved by install()


def _original_method(name: str):
    if name in ORIGINAL_METHODS:
        return ORIGINAL_METHODS[name]
    import importlib

    return getattr(importlib.import_module(CPU_WRAPPER_MODULE).PunicaWrapperCPU, name)  # not installed yet
