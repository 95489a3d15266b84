"""Load the frozen base into FSDP2 shards: no rank ever holds a whole copy of the base weights.

`actor_rollout_ref.actor.fsdp_config.load_weights=sharded` (the default):
  1. every rank builds the model with its parameters on the meta device (no memory; buffers such as the rotary
     `inv_freq` are computed for real, because the checkpoint does not hold them),
  2. LoRA is attached; its (small) tensors are made real and initialised from the seed, identically on all ranks,
  3. `fully_shard` splits every parameter along dim 0,
  4. `fill_shards` allocates each rank's shard and reads from the safetensors files only the rows that rank owns.
`rank0` is verl's way (steps 1-3, then rank 0 reads each tensor whole and scatters the rows); `whole` is the old
path (every rank runs `from_pretrained` on the whole base, then shards). Both are kept to compare.

Why each rank reads its own rows by default: the rows a rank owns are one contiguous byte range of each tensor in
the file, so a rank reads 1/world_size of the bytes with plain reads, needs no collective per tensor and no
staging buffer, and rank 0 holds no more than the others (measured with 2 workers on a 468M-parameter model:
peak growth 0.56 of the model on both ranks, against 0.81 on rank 0 with `rank0`; docs/training.md). It needs the model
files on every node, which `model.use_shm` / the stage-model step already provide. The bytes are read with
`readinto` rather than through safetensors' mmap, because pages of a mapped file count towards the process's
resident memory until the map is closed, which would bring back the whole-copy peak for a single-file model.

FSDP2 shards dim 0 like `torch.chunk`: each rank gets ceil(N / world) rows, the last ranks fewer (or none).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from ground.errors import StageError
from ground.model_files import check_safetensors

log = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8}


# ------------------------------------------------------------------------------------------------ meta build
@contextlib.contextmanager
def parameters_on_meta():
    """Parameters created inside go to the meta device; buffers stay real (they are computed, not loaded).

    Patches `nn.Module.register_parameter` for the whole process while inside (a worker's setup is one thread)."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            kind = type(module._parameters[name])
            module._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_base_model(model_dir: str, dtype: torch.dtype) -> nn.Module:
    """The base architecture with meta parameters (no weights read, no memory) and real buffers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def materialize_meta_lora(peft_model) -> None:
    """PEFT puts new LoRA layers on the base layer's device, meta here: give them real (uninitialised) memory."""
    for module in peft_model.modules():
        for name in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            container = getattr(module, name, None)
            if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
                for key in list(container.keys()):
                    item = container[key]
                    if isinstance(item, nn.Module):
                        if any(p.is_meta for p in item.parameters()):
                            item.to_empty(device="cpu")
                    elif item.is_meta:
                        container[key] = nn.Parameter(torch.empty_like(item, device="cpu"))


# ------------------------------------------------------------------------------------------- fill the shards
def checkpoint_key(param_name: str) -> str:
    """`peft.base_model.model.model.layers.0.mlp.up_proj.base_layer.weight` -> `model.layers.0.mlp.up_proj.weight`."""
    name = param_name
    for prefix in ("peft.", "base_model.model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace(".base_layer.", ".")


class SafetensorsIndex:
    """Where each tensor of a model folder lives: file, dtype, shape, byte offset of its data."""

    def __init__(self, model_dir: str | Path):
        self.entries: dict[str, tuple[Path, torch.dtype, list[int], int]] = {}
        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise StageError(f"`{model_dir}` has no *.safetensors weight files to load the base model from.")
        for path in files:
            header = check_safetensors(path)
            with open(path, "rb") as f:
                data_start = 8 + int.from_bytes(f.read(8), "little")
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info["dtype"] not in _SAFETENSORS_DTYPES:
                    raise StageError(f"Tensor `{key}` in {path} has dtype {info['dtype']}, which the sharded loader "
                                     "does not read. Set actor_rollout_ref.actor.fsdp_config.load_weights=whole.")
                self.entries[key] = (path, _SAFETENSORS_DTYPES[info["dtype"]], info["shape"],
                                     data_start + info["data_offsets"][0])

    def read_rows_into(self, key: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Copy rows [start, stop) of tensor `key` into `out` (shape [stop-start, *shape[1:]]), reading only them."""
        path, dtype, shape, offset = self.entries[key]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        if len(shape) == 0:  # a scalar: one "row"
            row_bytes = dtype.itemsize
        direct = out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous()
        target = out if direct else torch.empty(out.shape, dtype=dtype)
        with open(path, "rb") as f:
            f.seek(offset + start * row_bytes)
            view = memoryview(target.view(-1).view(torch.uint8).numpy())
            if f.readinto(view) != (stop - start) * row_bytes:
                raise StageError(f"Weight file {path} ended inside tensor `{key}`. Re-copy the model folder.")
        if not direct:
            out.copy_(target)


def _owned_rows(param) -> tuple[int, int]:
    """Rows [start, stop) of dim 0 that this rank's FSDP2 shard of `param` (a DTensor, Shard(0)) holds."""
    from torch.distributed.tensor import Shard

    placements = param.placements
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise StageError(f"The sharded loader expects FSDP2's Shard(0) placement, got {placements}.")
    mesh = param.device_mesh
    rows = param.shape[0] if param.dim() else 1
    chunk = math.ceil(rows / mesh.size())
    start = min(rows, mesh.get_local_rank() * chunk)
    return start, min(rows, start + chunk)


@torch.no_grad()
def fill_shards(model: nn.Module, model_dir: str, device: torch.device, show_progress: bool = False,
                from_rank0: bool = False) -> dict:
    """Give every meta parameter of the (already fully_shard-ed) model its real shard, read from the files
    (from_rank0: rank 0 reads every tensor whole and scatters the rows; the others read only the headers).

    Real tensors (LoRA, value head, buffers) keep their values across the allocation. Returns
    {"bytes_read": int, "tensors": int}.
    """
    from tqdm import tqdm

    meta = {n for n, p in model.named_parameters() if p.is_meta}
    kept_params = {n: p.to_local().detach().clone() if hasattr(p, "to_local") else p.detach().clone()
                   for n, p in model.named_parameters() if not p.is_meta}
    kept_buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        if name in kept_params:
            _local(param).copy_(kept_params[name])
    for name, buf in model.named_buffers():
        buf.copy_(kept_buffers[name])
    index = SafetensorsIndex(model_dir)
    nbytes = 0
    for name, param in tqdm([(n, p) for n, p in model.named_parameters() if n in meta], desc="loading shards",
                            unit="tensor", disable=not show_progress):
        key = checkpoint_key(name)
        if key not in index.entries:
            raise StageError(
                f"The base model in {model_dir} has no tensor `{key}` (wanted for parameter `{name}`). The sharded "
                "loader maps parameter names to the checkpoint's names directly; for a checkpoint that renames them, "
                "set actor_rollout_ref.actor.fsdp_config.load_weights=whole."
            )
        _, _, shape, _ = index.entries[key]
        if list(shape) != list(param.shape):
            raise StageError(f"Tensor `{key}` in {model_dir} has shape {shape}; the model built from its config.json "
                             f"expects {list(param.shape)}. The folder's config and weights do not belong together.")
        local = _local(param)
        if from_rank0:
            nbytes += _scatter_from_rank0(index, key, param, local)
            continue
        if hasattr(param, "placements"):
            start, stop = _owned_rows(param)
        else:  # not sharded (a module outside fully_shard): the whole tensor
            start, stop = 0, param.shape[0] if param.dim() else 1
        if local.numel():
            index.read_rows_into(key, start, stop, local)
            nbytes += local.numel() * local.element_size()
    return {"bytes_read": nbytes, "tensors": len(meta)}


def _scatter_from_rank0(index: SafetensorsIndex, key: str, param, local: torch.Tensor) -> int:
    """verl's way, kept to compare (`load_weights=rank0`): rank 0 reads the whole tensor and scatters each rank
    its rows (padded to equal chunks). Returns the bytes this rank read from the files."""
    import torch.distributed as dist

    mesh = param.device_mesh
    group, world, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    rows = param.shape[0]
    chunk = math.ceil(rows / world)
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    received = torch.empty((chunk, *param.shape[1:]), dtype=local.dtype, device=comm)
    pieces, nbytes = None, 0
    if rank == 0:
        full = torch.empty(tuple(param.shape), dtype=local.dtype)
        index.read_rows_into(key, 0, rows, full)
        nbytes = full.numel() * full.element_size()
        pieces = [torch.zeros_like(received) for _ in range(world)]
        for piece, part in zip(pieces, full.split(chunk)):
            piece[: part.shape[0]].copy_(part)
        del full
    dist.scatter(received, scatter_list=pieces, src=dist.get_global_rank(group, 0), group=group)
    if local.numel():
        local.copy_(received[: local.shape[0]])
    return nbytes


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param.data


def describe(model_dir: str) -> dict:
    """Parameter count and bytes of a model folder's safetensors, from the headers only (for logs and tests)."""
    index = SafetensorsIndex(model_dir)
    numel = sum(math.prod(shape) for _, _, shape, _ in index.entries.values())
    nbytes = sum(math.prod(shape) * dtype.itemsize for _, dtype, shape, _ in index.entries.values())
    return {"params": numel, "bytes": nbytes, "config": json.loads((Path(model_dir) / "config.json").read_text())}
