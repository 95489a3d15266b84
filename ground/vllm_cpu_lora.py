"""Segmented LoRA products for vLLM's CPU engine, installed as a vLLM general plugin.

vLLM 0.32's CPU punica wrapper runs every LoRA layer through its torch ops (`vllm/lora/ops/torch_ops`), which
index the stacked adapter weights with one slot *per token* (`weights[token_slots]`): a fresh copy of a whole
[out, rank] or [rank, in] matrix for every token, then a batched matrix-vector product. That made LoRA
generation 5-20% of the base model's speed on this project's CPU machines.

The work a LoRA adds does not depend on how many adapters share the batch: group the tokens by adapter slot
and do one `x @ A^T` (shrink) and one `h @ B^T` (expand) per group, straight from the stacked weights (a view
of one slot, never a per-token copy). Prefill already arrives grouped (vLLM passes runs of consecutive tokens
with the same slot: start, length, slot); decode passes one slot per token, grouped here. Slot -1 means "no
adapter": those rows get nothing added (and zeros where the upstream op assigns rather than adds).

The functions below keep the upstream signatures and semantics (dtype casts, `scaling`, `add_inputs`, the
expand op's common-width clipping, output slices) and replace the names the CPU punica wrapper module calls.
Calls whose shapes fall outside what those semantics cover here (row counts that disagree) go to the
upstream op unchanged.

One deliberate difference: upstream, a -1 slot indexes the LAST adapter slot (Python negative indexing), so a
no-adapter token in a batch whose last slot is occupied would get that adapter's delta; here it gets none.

The plugin is loaded by every vLLM process; it patches only on the CPU platform, only on the vLLM version it
was tested with, and not when LORA_PIPELINE_CPU_LORA_OPS=0. It also installs the merged-weight fast path for
single-adapter batches (ground/vllm_cpu_lora_merged.py). Nothing else of ours is imported.
"""

from __future__ import annotations

import logging
import os

import torch  # already imported by every vLLM process that loads this plugin

log = logging.getLogger(__name__)

ENV_SWITCH = "LORA_PIPELINE_CPU_LORA_OPS"
TESTED_VLLM_VERSIONS = ("0.32.0",)
# the names the CPU punica wrapper module imports from vllm.lora.ops.torch_ops and calls
PATCHED_NAMES = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand",
                 "sgmv_expand_slice")
_CPU_WRAPPER_MODULE = "vllm.lora.punica_wrapper.punica_cpu"

_state = {"patched": False}


# ---------------------------------------------------------------- grouping tokens by adapter slot

def _groups_from_token_slots(token_slots):
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


def _groups_from_runs(run_starts, run_lengths, run_slots):
    """[(slot, rows slice)] from vLLM's prefill metadata (runs of consecutive tokens sharing a slot)."""
    groups, covered = [], True
    for start, length, slot in zip(run_starts.tolist(), run_lengths.tolist(), run_slots.tolist()):
        if slot >= 0:
            groups.append((slot, slice(start, start + length)))
        elif length:
            covered = False
    return groups, covered


# ---------------------------------------------------------------- one product per group

def _slot_matrices(weights):
    # stacked LoRA weights are [slots, 1, out, in] (or [slots, out, in]); the upstream ops squeeze dim 1
    return weights.squeeze(1) if weights.dim() == 4 else weights


def _grouped_product(x, weights, out, groups, covered, add: bool, scaling: float = 1.0) -> None:
    """out[rows] (+)= scaling * x[rows] @ weights[slot]^T for each (slot, rows); out may be a column view.

    Otherwise in out's dtype, as upstream: each slot's matrix is cast to it once per group (a no-op when equal),
    then one fused addmm per group, in place on the output rows when they are a contiguous range (beta=0
    assigns)."""
    matrices = _slot_matrices(weights)
    if not add and not covered:
        out.zero_()  # rows without an adapter: the assigning upstream op writes a zero product there
    beta = 1 if add else 0
    for slot, rows in groups:
        weight = matrices[slot]
        if x.dtype != out.dtype and x.dtype == weight.dtype:
            # shrink of a bf16 model into vLLM's float32 buffer: the product in bf16, then widened. Upstream widens
            # x and A first, but a float32 GEMM with 16 output columns ran 4-7x slower than the bf16 one here,
            # and the next op (expand) rounds this buffer to bf16 anyway.
            widened = (x[rows] @ weight.t()).to(dtype=out.dtype)
            if scaling != 1.0:
                widened.mul_(scaling)
            if add:
                out[rows] += widened
            else:
                out[rows] = widened
            continue
        weight_t = weight.to(dtype=out.dtype).t()
        x_rows = x[rows].to(dtype=out.dtype)
        if isinstance(rows, slice):
            out[rows].addmm_(x_rows, weight_t, beta=beta, alpha=scaling)
        else:  # scattered rows: gather, compute, scatter back (activations only, never weights)
            out[rows] = torch.addmm(out[rows], x_rows, weight_t, beta=beta, alpha=scaling)


def _rows_agree(inputs, output, token_count: int) -> bool:
    return inputs.shape[0] == output.shape[0] == token_count


# ---------------------------------------------------------------- the six ops, upstream signatures

def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    rank = _slot_matrices(lora_a_weights).shape[-2]
    if not _rows_agree(inputs, output_tensor, lora_indices_tensor.shape[0]):
        return _upstream("bgmv_shrink")(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
    groups, covered = _groups_from_token_slots(lora_indices_tensor)
    _grouped_product(inputs, lora_a_weights, output_tensor[:, :rank], groups, covered, add=False, scaling=scaling)


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    if not _rows_agree(inputs, output_tensor, lora_indices_tensor.shape[0]):
        return _upstream("bgmv_expand")(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
    groups, covered = _groups_from_token_slots(lora_indices_tensor)
    _expand_clipped(inputs, lora_b_weights, output_tensor, groups, covered, add_inputs)


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    if not _rows_agree(inputs, output_tensor, lora_indices_tensor.shape[0]):
        return _upstream("bgmv_expand_slice")(inputs, lora_b_weights, output_tensor, lora_indices_tensor,
                                              slice_offset, slice_size, add_inputs)
    groups, covered = _groups_from_token_slots(lora_indices_tensor)
    _grouped_product(inputs.to(dtype=output_tensor.dtype), lora_b_weights,
                     output_tensor[:, slice_offset:slice_offset + slice_size], groups, covered, add=add_inputs)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches: int, max_seq_length: int, token_nums: int, scaling: float):
    if not _rows_agree(inputs, output_tensor, int(seq_len_tensor.sum())):
        return _upstream("sgmv_shrink")(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                                        lora_indices_tensor, batches, max_seq_length, token_nums, scaling)
    rank = _slot_matrices(lora_a_weights).shape[-2]
    groups, covered = _groups_from_runs(b_seq_start_loc, seq_len_tensor, lora_indices_tensor)
    _grouped_product(inputs, lora_a_weights, output_tensor[:, :rank], groups, covered, add=False, scaling=scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches: int, max_seq_length: int, token_nums: int, add_inputs: bool = False):
    if not _rows_agree(inputs, output_tensor, int(seq_len_tensor.sum())):
        return _upstream("sgmv_expand")(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                                        lora_indices_tensor, batches, max_seq_length, token_nums, add_inputs)
    groups, covered = _groups_from_runs(b_seq_start_loc, seq_len_tensor, lora_indices_tensor)
    _expand_clipped(inputs, lora_b_weights, output_tensor, groups, covered, add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                      lora_indices_tensor, batches: int, max_seq_length: int, token_nums: int, slice_offset: int,
                      slice_size: int, add_inputs: bool = False):
    if not _rows_agree(inputs, output_tensor, int(seq_len_tensor.sum())):
        return _upstream("sgmv_expand_slice")(inputs, lora_b_weights, output_tensor, b_seq_start_loc,
                                              seq_len_tensor, lora_indices_tensor, batches, max_seq_length,
                                              token_nums, slice_offset, slice_size, add_inputs)
    groups, covered = _groups_from_runs(b_seq_start_loc, seq_len_tensor, lora_indices_tensor)
    _grouped_product(inputs.to(dtype=output_tensor.dtype), lora_b_weights,
                     output_tensor[:, slice_offset:slice_offset + slice_size], groups, covered, add=add_inputs)


def _expand_clipped(inputs, lora_b_weights, output_tensor, groups, covered, add_inputs: bool) -> None:
    # the adapter and the model may pad their widths differently: like upstream, write the common width only
    matrices = _slot_matrices(lora_b_weights)
    common = min(matrices.shape[-2], output_tensor.shape[1])
    _grouped_product(inputs.to(dtype=output_tensor.dtype), matrices[:, :common], output_tensor[:, :common],
                     groups, covered, add=add_inputs)


# ---------------------------------------------------------------- one fused call per LoRA linear layer
#
# With the six ops above, vLLM's wrapper still runs, per LoRA layer and forward, a float32 zero buffer per
# slice, one shrink and one expand call per slice, and the token grouping once per call. At the demo's decode
# shape (64 tokens, 4 LoRA layers x 30 decoder layers, 7 slices) that Python and dispatch work, not the
# multiply-adds, was most of the LoRA time. So the wrapper's add_lora_linear is replaced too: the tokens are
# grouped once per forward (in update_metadata), and per layer and group there is ONE shrink GEMM for all
# slices (their A matrices stacked: the slices share the input) and one addmm per slice into its output
# columns. Same arithmetic as the ops above: shrink in the input's dtype when the weights share it, scaling
# in float32 (vLLM's buffer dtype), expand in the output's dtype, adding into the output.

def _remember_token_groups(wrapper) -> None:
    slots = wrapper.token_lora_indices
    groups, _ = _groups_from_token_slots(slots)
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
    rank = lora_b_stacked[0].shape[-1]
    for slot, rows in groups:
        a_all = torch.cat([_slot_matrices(a)[slot] for a in lora_a_stacked]) if len(lora_a_stacked) > 1 \
            else _slot_matrices(lora_a_stacked[0])[slot]
        x_rows = x[rows]
        if a_all.dtype != x.dtype:  # upstream's float32 buffer arithmetic
            x_rows, a_all = x_rows.float(), a_all.float()
        shrunk = x_rows @ a_all.t()
        if scale != 1.0:
            shrunk = shrunk.float().mul_(scale)
        shrunk = shrunk.to(dtype=y_2d.dtype)
        offset = 0
        for index, (lora_b, size) in enumerate(zip(lora_b_stacked, output_slices)):
            b_t = _slot_matrices(lora_b)[slot].to(dtype=y_2d.dtype).t()
            columns = y_2d[:, offset:offset + size]
            part = shrunk[:, index * rank:(index + 1) * rank]
            if isinstance(rows, slice):
                columns[rows].addmm_(part, b_t)
            else:  # scattered rows: gather, compute, scatter back (activations only, never weights)
                columns[rows] = torch.addmm(columns[rows], part, b_t)
            offset += size
    return None


# ---------------------------------------------------------------- many adapters in one batch
#
# The loop above costs, per adapter group and layer, a shrink GEMM, casts and one addmm per slice, plus a gather
# and a scatter when the group's rows are scattered (decoding requests of several adapters). Measured per decoder
# layer (its 4 LoRA layers, SmolLM2 shapes, bf16, rank 16, one thread), 16 decode tokens: base 0.62 ms, one
# group 1.14 ms, 8 interleaved groups 4.1 ms. With several groups it is cheaper to multiply every row by EVERY
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
    slot_count, rank = _slot_matrices(lora_a_stacked[0]).shape[:2]
    a_rows = _cached_layout(lora_a_stacked, "_lora_pipeline_a_rows", lora_a_stacked[0].dtype, lambda: torch.cat(
        [_slot_matrices(a).reshape(slot_count * rank, -1) for a in lora_a_stacked]))
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
        b_rows = _cached_layout((lora_b,), "_lora_pipeline_b_rows", y_2d.dtype, lambda b=lora_b: _slot_matrices(b)
                                .transpose(1, 2).reshape(slot_count * rank, -1).to(dtype=y_2d.dtype))
        y_2d[:, offset:offset + size].addmm_(shrunk[:, index], b_rows)
        offset += size


_PATCHED_METHODS = ("update_metadata", "add_lora_linear")
_ORIGINAL_METHODS: dict = {}  # vLLM's own, saved by install()


def _original_method(name: str):
    if name in _ORIGINAL_METHODS:
        return _ORIGINAL_METHODS[name]
    import importlib

    return getattr(importlib.import_module(_CPU_WRAPPER_MODULE).PunicaWrapperCPU, name)  # not installed yet


def _upstream(name: str):
    from vllm.lora.ops.torch_ops import lora_ops

    return getattr(lora_ops, name)


# ---------------------------------------------------------------- the plugin

def register() -> None:
    """vLLM general-plugin entry point: replace the CPU punica wrapper's LoRA ops (idempotent)."""
    if _state["patched"]:
        return
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        log.info("segmented CPU LoRA ops off (%s=%s): vLLM's own torch ops run", ENV_SWITCH, os.environ[ENV_SWITCH])
        return
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if version.split("+")[0] not in TESTED_VLLM_VERSIONS:
        log.warning("segmented CPU LoRA ops off: tested with vLLM %s only, this is %s; vLLM's own (slow) torch "
                    "ops run", ", ".join(TESTED_VLLM_VERSIONS), version)
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    install()
    log.info("segmented CPU LoRA ops on (vLLM %s); %s=0 turns them off", version, ENV_SWITCH)
    from ground import vllm_cpu_lora_merged  # single-adapter batches: one GEMM with merged weights

    vllm_cpu_lora_merged.install()


def install() -> None:
    """Point the CPU punica wrapper module's op names at the segmented ops and its update_metadata /
    add_lora_linear at the fused ones (no checks: register() does them)."""
    import importlib

    wrapper_module = importlib.import_module(_CPU_WRAPPER_MODULE)
    for name in PATCHED_NAMES:
        setattr(wrapper_module, name, globals()[name])
    cls = wrapper_module.PunicaWrapperCPU
    for name in _PATCHED_METHODS:
        if getattr(cls, name) is not globals()[name]:
            _ORIGINAL_METHODS[name] = getattr(cls, name)  # the class's own or the inherited one
            setattr(cls, name, globals()[name])
    _state["patched"] = True


def uninstall() -> None:
    """Put vLLM's own torch ops back (benchmarks compare both in one process)."""
    import importlib

    from vllm.lora.ops.torch_ops import lora_ops

    wrapper_module = importlib.import_module(_CPU_WRAPPER_MODULE)
    for name in PATCHED_NAMES:
        setattr(wrapper_module, name, getattr(lora_ops, name))
    for name, original in _ORIGINAL_METHODS.items():
        setattr(wrapper_module.PunicaWrapperCPU, name, original)
    from ground import vllm_cpu_lora_merged

    vllm_cpu_lora_merged.uninstall()
    _state["patched"] = False
