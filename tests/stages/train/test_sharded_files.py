"""The pieces of sharded loading that need no process group: row reads from safetensors, name mapping, meta build."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ground.errors import StageError
from stages.train import sharded_load


def test_read_rows_reads_exactly_the_rows_in_any_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(7, 5, generator=g).to(torch.bfloat16), "b": torch.randn(3, generator=g)}
    save_file(tensors, str(tmp_path / "model-1.safetensors"))
    save_file({"c": torch.arange(12, dtype=torch.float32).reshape(4, 3)}, str(tmp_path / "model-2.safetensors"))
    index = sharded_load.SafetensorsIndex(tmp_path)
    assert set(index.entries) == {"a", "b", "c"}
    same_dtype = torch.empty(3, 5, dtype=torch.bfloat16)
    index.read_rows_into("a", 2, 5, same_dtype)  # straight into the destination
    assert torch.equal(same_dtype, tensors["a"][2:5])
    converted = torch.empty(2, 3, dtype=torch.bfloat16)
    index.read_rows_into("c", 2, 4, converted)  # through a buffer in the file's dtype
    assert torch.equal(converted, torch.arange(6, 12, dtype=torch.bfloat16).reshape(2, 3))
    empty = torch.empty(0, 5, dtype=torch.bfloat16)  # a rank that owns no rows
    index.read_rows_into("a", 7, 7, empty)
    last = torch.empty(1, dtype=torch.float32)
    index.read_rows_into("b", 2, 3, last)
    assert torch.equal(last, tensors["b"][2:])


def test_truncated_file_is_refused(tmp_path):
    save_file({"a": torch.ones(4, 4)}, str(tmp_path / "model.safetensors"))
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(StageError, match="truncated"):
        sharded_load.SafetensorsIndex(tmp_path)


def test_checkpoint_key_drops_wrappers():
    assert (sharded_load.checkpoint_key("peft.base_model.model.model.layers.3.mlp.up_proj.base_layer.weight")
            == "model.layers.3.mlp.up_proj.weight")
    assert sharded_load.checkpoint_key("peft.base_model.model.lm_head.weight") == "lm_head.weight"
    assert sharded_load.checkpoint_key("peft.base_model.model.model.norm.weight") == "model.norm.weight"


def test_meta_build_keeps_computed_buffers_real(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    empty = sharded_load.empty_base_model(str(tiny_model_dir), torch.float32)
    assert all(p.is_meta for p in empty.parameters())
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    buffers = dict(full.named_buffers())
    assert buffers, "the tiny Llama has rotary buffers"
    for name, buf in empty.named_buffers():
        assert not buf.is_meta and torch.equal(buf, buffers[name]), name
    # the patch is gone afterwards: modules built later get real parameters
    assert not torch.nn.Linear(2, 2).weight.is_meta
