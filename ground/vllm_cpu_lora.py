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
was tested with, and not when LORA_PIPELINE_CPU_LORA_OPS=0. It also installs one fused call per LoRA layer
(ground/vllm_cpu_lora_fused.py) and the merged-weight fast path for single-adapter batches
(ground/vllm_cpu_lora_merged.py). Nothing else of ours is imported.
"""

from __future__ import annotations

import logging
import os

import torch  # already imported by every vLLM process that loads this plugin

from ground import vllm_cpu_lora_fused as fused
from ground.vllm_cpu_lora_fused import CPU_WRAPPER_MODULE, groups_from_token_slots, slot_matrices

log = logging.getLogger(__name__)

ENV_SWITCH = "LORA_PIPELINE_CPU_LORA_OPS"
TESTED_VLLM_VERSIONS = ("0.32.0",)
# the names the CPU punica wrapper module imports from vllm.lora.ops.torch_ops and calls
PATCHED_NAMES = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand",
                 "sgmv_expand_slice")

_state = {"patched": False}


# ---------------------------------------------------------------- grouping tokens by adapter slot

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

def _grouped_product(x, weights, out, groups, covered, add: bool, scaling: float = 1.0) -> None:
    """out[rows] (+)= scaling * x[rows] @ weights[slot]^T for each (slot, rows); out may be a column view.

    Otherwise in out's dtype, as upstream: each slot's matrix is cast to it once per group (a no-op when equal),
    then one fused addmm per group, in place on the output rows when they are a contiguous range (beta=0
    assigns)."""
    matrices = slot_matrices(weights)
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
    rank = slot_matrices(lora_a_weights).shape[-2]
    if not _rows_agree(inputs, output_tensor, lora_indices_tensor.shape[0]):
        return _upstream("bgmv_shrink")(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
    groups, covered = groups_from_token_slots(lora_indices_tensor)
    _grouped_product(inputs, lora_a_weights, output_tensor[:, :rank], groups, covered, add=False, scaling=scaling)


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    if not _rows_agree(inputs, output_tensor, lora_indices_tensor.shape[0]):
        return _upstream("bgmv_expand")(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
    groups, covered = groups_from_token_slots(lora_indices_tensor)
    _expand_clipped(inputs, lora_b_weights, output_tensor, groups, covered, add_inputs)


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    if not _rows_agree(inputs, output_tensor, lora_indices_tensor.shape[0]):
        return _upstream("bgmv_expand_slice")(inputs, lora_b_weights, output_tensor, lora_indices_tensor,
                                              slice_offset, slice_size, add_inputs)
    groups, covered = groups_from_token_slots(lora_indices_tensor)
    _grouped_product(inputs.to(dtype=output_tensor.dtype), lora_b_weights,
                     output_tensor[:, slice_offset:slice_offset + slice_size], groups, covered, add=add_inputs)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches: int, max_seq_length: int, token_nums: int, scaling: float):
    if not _rows_agree(inputs, output_tensor, int(seq_len_tensor.sum())):
        return _upstream("sgmv_shrink")(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                                        lora_indices_tensor, batches, max_seq_length, token_nums, scaling)
    rank = slot_matrices(lora_a_weights).shape[-2]
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
    matrices = slot_matrices(lora_b_weights)
    common = min(matrices.shape[-2], output_tensor.shape[1])
    _grouped_product(inputs.to(dtype=output_tensor.dtype), matrices[:, :common], output_tensor[:, :common],
                     groups, covered, add=add_inputs)


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
    add_lora_linear at the fused ones (ground/vllm_cpu_lora_fused.py); no checks: register() does them."""
    import importlib

    wrapper_module = importlib.import_module(CPU_WRAPPER_MODULE)
    for name in PATCHED_NAMES:
        setattr(wrapper_module, name, globals()[name])
    cls = wrapper_module.PunicaWrapperCPU
    for name in fused.PATCHED_METHODS:
        if getattr(cls, name) is not getattr(fused, name):
            fused.ORIGINAL_METHODS[name] = getattr(cls, name)  # the class's own or the inherited one
            setattr(cls, name, getattr(fused, name))
    _state["patched"] = True


def uninstall() -> None:
    """Put vLLM's own torch ops back (benchmarks compare both in one process)."""
    import importlib

    from vllm.lora.ops.torch_ops import lora_ops

    wrapper_module = importlib.import_module(CPU_WRAPPER_MODULE)
    for name in PATCHED_NAMES:
        setattr(wrapper_module, name, getattr(lora_ops, name))
    for name, original in fused.ORIGINAL_METHODS.items():
        setattr(wrapper_module.PunicaWrapperCPU, name, original)
    from ground import vllm_cpu_lora_merged

    vllm_cpu_lora_merged.uninstall()
    _state["patched"] = False
