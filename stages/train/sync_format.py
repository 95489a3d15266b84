"""What the trainer writes for the rollout engine to load after each update.

Two sync formats, matching `actor_rollout_ref.rollout.lora_sync`:

- adapter: a PEFT adapter folder (`adapter_model.safetensors` + `adapter_config.json`) that vLLM reloads in place
  with `LoRARequest(..., load_inplace=True)`. Only the LoRA tensors travel (rank-16 all-linear on SmolLM2-135M:
  about 20 MB in bf16).
- merged: a model folder whose linear weights are W + (alpha/r)·B·A, written one shard per `add()` call so the
  actor can gather and merge one decoder layer at a time; vLLM reloads it with `reload_weights` and then decodes
  at base speed, without LoRA kernels.

Both folders live on a per-run directory on /dev/shm by default (RAM-backed, so a write costs a memcpy), see
`sync_root`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ground.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, saved_key
from ground.new_files import write_new_file
from ground.processes import owner_gone, write_owner

log = logging.getLogger(__name__)

MERGED_INDEX = "model.safetensors.index.json"
# Files of the base model folder that the engine (and transformers) need besides the weights.
BASE_SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model",
)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def sync_root(run_name: str, base: str | os.PathLike | None = None) -> Path:
    """A per-run folder for sync files: `<base>/lora-pipeline-sync-<run_name>`, base = /dev/shm when it exists.

    /dev/shm is RAM, so writing an adapter there costs a memory copy instead of a disk write; machines without
    it (macOS) fall back to the temp dir. The caller removes the folder with `remove_sync_root` at the end.
    """
    if not _SAFE_NAME.match(run_name):
        raise ValueError(f"sync folder name {run_name!r} must match {_SAFE_NAME.pattern}")
    if base is None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    _remove_orphans(Path(base))
    root = Path(base) / f"lora-pipeline-sync-{run_name}"
    root.mkdir(parents=True, exist_ok=True)
    write_owner(root / OWNER_FILE)
    return root


OWNER_FILE = ".owner"


def _remove_orphans(base: Path) -> None:
    """Remove sync folders whose owning process on this host is gone (a SIGKILLed run cannot clean up, and
    /dev/shm is RAM: each orphan holds a model's worth of it)."""
    for folder in base.glob("lora-pipeline-sync-*"):
        if owner_gone(folder / OWNER_FILE):
            log.info("removing %s, left by a run that no longer exists", folder)
            shutil.rmtree(folder, ignore_errors=True)


def remove_sync_root(root: str | os.PathLike) -> None:
    """Delete a folder made by `sync_root` (refuses anything else, so a bad path cannot wipe a real folder)."""
    root = Path(root)
    if not root.name.startswith("lora-pipeline-sync-"):
        raise ValueError(f"{root} is not a sync folder made by sync_root")
    shutil.rmtree(root, ignore_errors=True)


def _json_safe(value):
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if hasattr(value, "value") and value.__class__.__module__.startswith("peft"):  # PEFT enums (TaskType, ...)
        return value.value
    return value


def write_adapter(out_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], peft_config: dict) -> int:
    """Write a PEFT LoRA adapter folder that vLLM and `PeftModel.from_pretrained` both load. Returns bytes written.

    tensors: LoRA weights keyed as PEFT names them (`...q_proj.lora_A.weight`, shape (r, in);
    `...lora_B.weight`, shape (out, r)); the in-memory form with the adapter name (`lora_A.default.weight`) is
    accepted too. peft_config: `LoraConfig.to_dict()` or an equivalent dict; `r` and `lora_alpha` are required
    and kept as given, since vLLM scales the update by lora_alpha / r.

    Each file is written to a temporary name and moved over the old one (`write_new_file(..., replace=True)`), so
    an engine that reloads in place reads either the previous adapter or the new one, never half of a file. The weights go
    first and the config last: the config names the rank and the modules, and it only changes when they do.
    """
    if not tensors:
        raise ValueError("write_adapter got no tensors")
    config = _json_safe(dict(peft_config))
    missing = [k for k in ("r", "lora_alpha", "target_modules") if config.get(k) in (None, "", [])]
    if missing:
        raise ValueError(f"peft_config lacks {missing}; pass LoraConfig.to_dict() of the trained adapter")
    config.setdefault("peft_type", "LORA")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in tensors.items():
        key = saved_key(name)
        if ".lora_" not in key:
            raise ValueError(f"write_adapter: {name!r} is not a LoRA tensor (expected ...lora_A/lora_B.weight)")
        state[key] = tensor.detach().to("cpu").contiguous()
    weights = write_new_file(out / ADAPTER_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}),
                             replace=True)
    config_bytes = json.dumps(config, indent=2, sort_keys=True).encode()
    write_new_file(out / ADAPTER_CONFIG, lambda tmp: tmp.write_bytes(config_bytes), replace=True)
    return weights.stat().st_size + len(config_bytes)


def merge_lora_weight(base_w: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling·B·A in float32, returned in base_w's dtype.

    base_w: (out, in); lora_a: (r, in); lora_b: (out, r); scaling = lora_alpha / r (or alpha / sqrt(r) with
    rsLoRA). LoRA: https://arxiv.org/abs/2106.09685. The product is done in float32 so a bf16 base loses no more
    than one final rounding, as PEFT's merge does.
    """
    if lora_a.shape[0] != lora_b.shape[1] or base_w.shape != (lora_b.shape[0], lora_a.shape[1]):
        raise ValueError(f"shapes do not compose: W {tuple(base_w.shape)}, A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}")
    delta = (lora_b.float() @ lora_a.float()) * scaling
    return (base_w.float() + delta).to(base_w.dtype)


class MergedModelWriter:
    """Write a merged model folder shard by shard, so at most one layer's tensors are in flight at a time.

    Usage (the actor, after gathering and merging one decoder layer):
        writer = MergedModelWriter(out_dir, base_dir)
        for layer_tensors in ...:           # {"model.layers.0.self_attn.q_proj.weight": W + s·B·A, ...}
            writer.add(layer_tensors)
        nbytes = writer.finish()

    Names are the base model's own Hugging Face names. Give it every tensor of the model: on vLLM's CPU
    engine a folder holding only the changed (LoRA-targeted) linears reloaded wrong values (NaN logits,
    measured), so `gather.iter_merged_layers` sends whole layers.
    out_dir is emptied first; config and tokenizer files are copied from base_dir so the folder is a loadable
    model by itself (vLLM, transformers).
    """

    def __init__(self, out_dir: str | os.PathLike, base_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.base_dir = Path(base_dir)
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        self.out_dir.mkdir(parents=True)
        self.weight_map: dict[str, str] = {}
        self.bytes_written = 0
        self._tensor_bytes = 0  # payload only, as `total_size` in Hugging Face index files
        self._shards = 0
        self._finished = False
        for name in BASE_SIDE_FILES:
            src = self.base_dir / name
            if src.is_file():
                shutil.copy2(src, self.out_dir / name)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        if self._finished:
            raise RuntimeError("MergedModelWriter.add after finish")
        if not tensors:
            return
        dup = sorted(set(tensors) & set(self.weight_map))
        if dup:
            raise ValueError(f"tensors added twice: {dup[:3]}")
        self._shards += 1
        shard = f"model-part-{self._shards:05d}.safetensors"
        state = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        save_file(state, str(self.out_dir / shard), metadata={"format": "pt"})
        self.bytes_written += (self.out_dir / shard).stat().st_size
        self._tensor_bytes += sum(t.numel() * t.element_size() for t in state.values())
        self.weight_map.update({name: shard for name in state})

    def finish(self) -> int:
        """Write model.safetensors.index.json; returns the bytes of all shards plus the index."""
        if not self.weight_map:
            raise ValueError("MergedModelWriter.finish with no tensors added")
        index = {"metadata": {"total_size": self._tensor_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        data = json.dumps(index, indent=2).encode()
        write_new_file(self.out_dir / MERGED_INDEX, lambda tmp: tmp.write_bytes(data), replace=True)
        self._finished = True
        return self.bytes_written + len(data)


def merged_layers_from_peft(model) -> list[dict]:
    """The merged weights W + (alpha/r)·B·A of an unsharded PEFT model, one dict per decoder layer (plus one for
    the rest), under the base model's Hugging Face names: what `MergedModelWriter.add` takes, grouped as the
    actor's layered gather groups them. Benchmarks and tests use it on plain PEFT models."""
    cfg = model.peft_config["default"]
    scaling = cfg.lora_alpha / cfg.r
    lora = {n: p.detach() for n, p in model.named_parameters() if ".lora_" in n}
    groups: dict[str, dict] = {}
    for name, w in model.get_base_model().state_dict().items():
        if ".lora_" in name:
            continue
        hf_name = name.replace(".base_layer.", ".")
        prefix = hf_name.rsplit(".", 1)[0]
        a = lora.get(f"base_model.model.{prefix}.lora_A.default.weight")
        if a is not None and hf_name.endswith(".weight"):
            w = merge_lora_weight(w, a, lora[f"base_model.model.{prefix}.lora_B.default.weight"], scaling)
        key = hf_name.split(".")[2] if hf_name.startswith("model.layers.") else "rest"
        groups.setdefault(key, {})[hf_name] = w
    if getattr(model.config, "tie_word_embeddings", False):
        groups.get("rest", {}).pop("lm_head.weight", None)  # tied: the checkpoint stores the embedding once
    return list(groups.values())
