"""What `fsdp_config` turns into: the keyword arguments of `fully_shard` and the optimizer's offload hooks.

GPU (CUDA) workers:
- `param_offload` (actor or ref: both name the one shared base) -> FSDP2's `CPUOffloadPolicy(pin_memory=True)`.
  The sharded parameters live in pinned host memory and are copied to the GPU just before each layer's
  all-gather; gradients are copied back to host memory in backward and the optimizer steps on the CPU, so the
  AdamW state is in host memory too. For LoRA that state is small (2 fp32 tensors per LoRA weight); the
  frozen base is what the GPU is spared.
- `optimizer_offload` alone (parameters on the GPU) -> as verl does it: the optimizer state moves to host memory
  after every step and back to the GPU just before the next one (optimizer step hooks), so between steps, while
  vLLM generates, the GPU holds no optimizer state.
CPU workers: everything is already in host memory; an offload setting changes nothing, which is logged once.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)
_cpu_notice_logged = False


def effective_param_offload(arr_cfg) -> bool:
    """The actor and the reference share one base (the reference is the adapter switched off): offload it if
    either asks."""
    return bool(arr_cfg.actor.fsdp_config.param_offload or arr_cfg.ref.fsdp_config.param_offload)


def fully_shard_kwargs(arr_cfg, device_type: str, dtype: torch.dtype) -> dict:
    """`fully_shard(module, **kwargs)` for every FSDP unit, from `actor_rollout_ref` and the worker's device.

    Uniform param_dtype casts the fp32 LoRA weights to the base dtype for compute; gradients reduce in float32.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    fsdp = arr_cfg.actor.fsdp_config
    kwargs = {"mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32),
              "reshard_after_forward": fsdp.reshard_after_forward}
    param_offload = effective_param_offload(arr_cfg)
    if device_type == "cuda":
        if param_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
    elif param_offload or fsdp.optimizer_offload:
        _log_cpu_notice_once()
    return kwargs


def wants_optimizer_hooks(arr_cfg, device_type: str) -> bool:
    """optimizer_offload needs its own hooks only on CUDA without param offload (CPUOffloadPolicy covers it)."""
    return device_type == "cuda" and arr_cfg.actor.fsdp_config.optimizer_offload and not effective_param_offload(arr_cfg)


def offload_optimizer_between_steps(optimizer: torch.optim.Optimizer, compute_device: torch.device,
                                    offload_device: torch.device = torch.device("cpu")) -> None:
    """Keep `optimizer`'s state on `offload_device` except during `step()`, where it is on `compute_device`."""

    def move_state(device):
        for state in optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.device != device and key != "step":
                    state[key] = value.to(device, non_blocking=True)

    optimizer.register_step_pre_hook(lambda opt, args, kwargs: move_state(compute_device))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: move_state(offload_device))


def _log_cpu_notice_once() -> None:
    global _cpu_notice_logged
    if not _cpu_notice_logged:
        _cpu_notice_logged = True
        log.info("fsdp_config param_offload/optimizer_offload: the workers run on CPU, where the weights, gradients "
                 "and optimizer state already live in host memory; nothing to offload")
