"""fsdp_config -> fully_shard keyword arguments and optimizer offload hooks, without CUDA (the mapping is pure)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

from config import load_config
from stages.train import fsdp_setup

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def _arr(*overrides):
    return load_config(None, list(overrides)).actor_rollout_ref


def test_param_offload_maps_to_cpu_offload_policy_on_gpu():
    kwargs = fsdp_setup.fully_shard_kwargs(_arr("actor_rollout_ref.actor.fsdp_config.param_offload=true"),
                                           "cuda", torch.bfloat16)
    assert isinstance(kwargs["offload_policy"], CPUOffloadPolicy) and kwargs["offload_policy"].pin_memory
    assert isinstance(kwargs["mp_policy"], MixedPrecisionPolicy)
    assert (kwargs["mp_policy"].param_dtype, kwargs["mp_policy"].reduce_dtype) == (torch.bfloat16, torch.float32)
    # the reference is the same base with the adapter off: its param_offload offloads that shared base
    ref_only = fsdp_setup.fully_shard_kwargs(_arr("actor_rollout_ref.ref.fsdp_config.param_offload=true"),
                                             "cuda", torch.bfloat16)
    assert isinstance(ref_only["offload_policy"], CPUOffloadPolicy)
    assert "offload_policy" not in fsdp_setup.fully_shard_kwargs(_arr(), "cuda", torch.bfloat16)
    assert fsdp_setup.fully_shard_kwargs(_arr("actor_rollout_ref.actor.fsdp_config.reshard_after_forward=false"),
                                         "cuda", torch.bfloat16)["reshard_after_forward"] is False


def test_optimizer_offload_alone_uses_step_hooks_on_gpu_only():
    opt_only = _arr("actor_rollout_ref.actor.fsdp_config.optimizer_offload=true")
    assert "offload_policy" not in fsdp_setup.fully_shard_kwargs(opt_only, "cuda", torch.bfloat16)
    assert fsdp_setup.wants_optimizer_hooks(opt_only, "cuda")
    assert not fsdp_setup.wants_optimizer_hooks(opt_only, "cpu")
    both = _arr("actor_rollout_ref.actor.fsdp_config.optimizer_offload=true",
                "actor_rollout_ref.actor.fsdp_config.param_offload=true")
    assert not fsdp_setup.wants_optimizer_hooks(both, "cuda")  # CPUOffloadPolicy already steps on the CPU


def test_the_72b_example_reaches_the_offload_policy():
    arr = load_config(EXAMPLES / "qwen2_5_72b_lora_layered_summon.yaml").actor_rollout_ref
    assert isinstance(fsdp_setup.fully_shard_kwargs(arr, "cuda", torch.bfloat16)["offload_policy"], CPUOffloadPolicy)
    arr3b = load_config(EXAMPLES / "qwen2_5_3b_gsm8k_grpo_lora.yaml").actor_rollout_ref
    # verl's 3B example offloads only the reference; here that is the shared base
    assert isinstance(fsdp_setup.fully_shard_kwargs(arr3b, "cuda", torch.bfloat16)["offload_policy"],
                      CPUOffloadPolicy)


def test_offload_on_cpu_is_logged_once_and_changes_nothing(caplog, monkeypatch):
    monkeypatch.setattr(fsdp_setup, "_cpu_notice_logged", False)
    arr = _arr("actor_rollout_ref.actor.fsdp_config.param_offload=true",
               "actor_rollout_ref.actor.fsdp_config.optimizer_offload=true")
    with caplog.at_level(logging.INFO, logger=fsdp_setup.__name__):
        first = fsdp_setup.fully_shard_kwargs(arr, "cpu", torch.float32)
        fsdp_setup.fully_shard_kwargs(arr, "cpu", torch.float32)
    assert "offload_policy" not in first
    notices = [r for r in caplog.records if "host memory" in r.getMessage()]
    assert len(notices) == 1

