"""Sync writers: PEFT adapter folders and merged model folders (no engine here; test_rollout.py loads them)."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch

from ground.adapter_files import saved_key
from safetensors.torch import load_file

from stages.train import sync_format
from stages.train.sync_format import (
    MergedModelWriter, merge_lora_weight, remove_sync_root, sync_root, write_adapter,
)

PEFT_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 12, "target_modules": {"v_proj", "q_proj"},
               "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"}


def _lora_tensors(scale: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i in range(2):
        for proj in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            out[f"{prefix}.lora_A.default.weight"] = torch.randn(4, 64, generator=gen) * scale
            out[f"{prefix}.lora_B.default.weight"] = torch.randn(32, 4, generator=gen) * scale
    return out


def test_peft_key_drops_adapter_name_only():
    assert saved_key("base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight") == \
        "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
    assert saved_key("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight") == \
        "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"


def test_write_adapter_round_trips_and_counts_bytes(tmp_path):
    tensors = _lora_tensors(1.0)
    nbytes = write_adapter(tmp_path / "a", tensors, PEFT_CONFIG)
    files = sorted(os.listdir(tmp_path / "a"))
    assert files == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files left behind
    assert nbytes == sum((tmp_path / "a" / f).stat().st_size for f in files)
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert set(saved) == {saved_key(k) for k in tensors}
    for k, v in tensors.items():
        assert torch.equal(saved[saved_key(k)], v)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 12 and config["r"] == 4 and config["target_modules"] == ["q_proj", "v_proj"]


def test_written_adapter_loads_in_peft(tmp_path, tiny_model_dir):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.25)
    state = {n: p.detach() for n, p in model.named_parameters() if ".lora_" in n}
    write_adapter(tmp_path / "a", state, model.peft_config["default"].to_dict())
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "a")
    assert loaded.peft_config["default"].lora_alpha == 12
    for n, p in loaded.named_parameters():
        if ".lora_" in n:
            assert torch.equal(p, state[n])


def test_write_adapter_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="lora_alpha"):
        write_adapter(tmp_path / "a", _lora_tensors(1.0), {"r": 4, "target_modules": ["q_proj"]})
    with pytest.raises(ValueError, match="not a LoRA tensor"):
        write_adapter(tmp_path / "a", {"model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)}, PEFT_CONFIG)


def test_write_adapter_is_atomic_for_a_concurrent_reader(tmp_path):
    """A reader polling the folder while it is rewritten always finds a whole file: the old one or the new one."""
    out = tmp_path / "a"
    versions = [_lora_tensors(float(s)) for s in (1, 2)]
    write_adapter(out, versions[0], PEFT_CONFIG)
    stop = threading.Event()
    seen, errors = set(), []

    def reader():
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        while not stop.is_set():
            try:
                t = load_file(str(out / "adapter_model.safetensors"))[key]
            except Exception as e:  # a torn file would raise here
                errors.append(e)
                continue
            seen.add(round(float(t.abs().sum() / versions[0][key.replace("lora_A", "lora_A.default")].abs().sum())))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(40):
            write_adapter(out, versions[i % 2], PEFT_CONFIG)
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert seen <= {1, 2}


def test_merge_lora_weight_matches_formula_and_checks_shapes():
    gen = torch.Generator().manual_seed(1)
    w, a, b = torch.randn(6, 5, generator=gen), torch.randn(2, 5, generator=gen), torch.randn(6, 2, generator=gen)
    torch.testing.assert_close(merge_lora_weight(w, a, b, 1.5), w + 1.5 * b @ a)
    assert merge_lora_weight(w.bfloat16(), a, b, 1.5).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="shapes"):
        merge_lora_weight(w, a.T, b, 1.0)


def test_merged_writer_shards_index_and_side_files(tmp_path, tiny_model_dir):
    writer = MergedModelWriter(tmp_path / "m", tiny_model_dir)
    layer0 = {"model.layers.0.mlp.up_proj.weight": torch.ones(8, 4)}
    layer1 = {"model.layers.1.mlp.up_proj.weight": torch.zeros(8, 4, dtype=torch.bfloat16),
              "model.norm.weight": torch.ones(4)}
    writer.add(layer0)
    writer.add(layer1)
    with pytest.raises(ValueError, match="twice"):
        writer.add(layer0)
    nbytes = writer.finish()
    folder = tmp_path / "m"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 2
    assert index["metadata"]["total_size"] == 8 * 4 * 4 + 8 * 4 * 2 + 4 * 4
    assert nbytes == sum((folder / s).stat().st_size for s in shards) + (folder / "model.safetensors.index.json").stat().st_size
    assert (folder / "config.json").read_text() == (tiny_model_dir / "config.json").read_text()
    assert (folder / "tokenizer.json").is_file()
    loaded = load_file(str(folder / index["weight_map"]["model.norm.weight"]))
    assert torch.equal(loaded["model.norm.weight"], torch.ones(4))
    # a new writer on the same folder starts from empty: no stale shards from the previous sync
    MergedModelWriter(folder, tiny_model_dir).add(layer0)
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) == 1


def test_sync_root_prefers_dev_shm_and_cleans_up(tmp_path, monkeypatch):
    root = sync_root("run-1", base=tmp_path)
    assert root.is_dir() and root.parent == tmp_path
    remove_sync_root(root)
    assert not root.exists()
    with pytest.raises(ValueError):
        sync_root("../escape", base=tmp_path)
    with pytest.raises(ValueError):
        remove_sync_root(tmp_path)
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        default = sync_root("test-sync-root-default")
        try:
            assert str(default).startswith("/dev/shm/")
        finally:
            remove_sync_root(default)
    # no /dev/shm (macOS): the temp dir
    real_isdir = os.path.isdir
    monkeypatch.setattr(sync_format.os.path, "isdir", lambda p: False if str(p) == "/dev/shm" else real_isdir(p))
    monkeypatch.setattr(sync_format.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    fallback = sync_root("run-2")
    assert fallback.parent == tmp_path / "tmp"


def test_sync_root_removes_folders_of_dead_runs(tmp_path):
    import subprocess
    import sys

    from stages.train.sync_format import OWNER_FILE, sync_root

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    orphan = tmp_path / "lora-pipeline-sync-orphan"
    orphan.mkdir()
    (orphan / OWNER_FILE).write_text(f"{socket.gethostname()} {dead.stdout.strip()}")
    (orphan / "model.safetensors").write_bytes(b"x" * 10)
    foreign = tmp_path / "lora-pipeline-sync-foreign"  # no owner file: not ours to judge
    foreign.mkdir()
    mine = sync_root("mine", base=tmp_path)
    live = sync_root("live", base=tmp_path)  # this process is alive: kept
    assert not orphan.exists() and foreign.exists() and mine.exists() and live.exists()
