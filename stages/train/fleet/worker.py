"""The fleet's actor: one process holding the base once and every member's LoRA weights, sharded with FSDP2
(the same layout as the single path's ActorWorker), run as a Ray actor by fleet/recipe.py.

World size 1 (one rank over gloo) in this slice: several ranks need equal micro-batch counts per rank, which
the fleet update does not arrange yet (docs/training.md, "Fleet training"). The update itself (KL reference,
warmup, epochs, mini-batches) is fleet/update_loop.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ground.errors import StageError
from ground.logs import redirect_process_output
from stages.train.fleet.members import FleetMember

LORA_STATE = "fleet_lora.pt"
OPTIMIZER_STATE = "fleet_optimizer.pt"
UPDATES_STATE = "fleet_updates.json"  # {member name: its update count}


def _members(raw: list[dict]) -> list[FleetMember]:
    return [FleetMember(**{**m, "betas": tuple(m["betas"])}) for m in raw]


class FleetWorker:
    def __init__(self, cfg: dict, model_dir: str, members: list[dict], start_adapters: dict[int, str],
                 threads: int):
        from config import Config

        redirect_process_output("fleet actor")
        self.cfg = Config.model_validate(cfg)
        self.model_dir = str(model_dir)
        self.members = _members(members)
        self.start_adapters = {int(k): v for k, v in start_adapters.items()}
        # each member's actor updates so far (RL steps with its rows): its warmup and shuffle seed count them,
        # as the single path's LR scheduler counts update_actor calls
        self.updates = [0] * len(self.members)
        torch.set_num_threads(max(1, threads))

    def setup(self) -> dict:
        """gloo group of one -> fleet model (+ start adapters) -> FSDP2 shards -> one AdamW, a group per member."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        from ground.ports import free_port
        from stages.train import fsdp_setup
        from stages.train.actor_worker import resolve_dtype
        from stages.train.fleet.model import build_fleet_model, shard_fleet_model
        from stages.train.fleet.update import FleetOptimizer

        t0 = time.perf_counter()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        arr = self.cfg.actor_rollout_ref
        dtype = resolve_dtype(arr.model.dtype, self.model_dir, "cpu")
        self.model = build_fleet_model(self.model_dir, self.members, arr.model.target_modules,
                                       seed=self.cfg.trainer.seed, dtype=dtype,
                                       gradient_checkpointing=arr.model.enable_gradient_checkpointing)
        for index, folder in self.start_adapters.items():
            self._load_start_adapter(index, folder)
        kwargs = fsdp_setup.fully_shard_kwargs(arr, "cpu", dtype)
        kwargs["mesh"] = init_device_mesh("cpu", (1,))
        shard_fleet_model(self.model, **kwargs)
        self.optimizer = FleetOptimizer(self.model)
        return {"seconds": time.perf_counter() - t0}

    def _load_start_adapter(self, index: int, folder: str) -> None:
        """Member `index` starts from a PEFT adapter folder (its rank must be the member's)."""
        from safetensors.torch import load_file

        from stages.train.fleet.lora import fleet_layers

        member = self.members[index]
        saved = load_file(str(Path(folder) / "adapter_model.safetensors"))
        layers = dict(fleet_layers(self.model.lm))
        with torch.no_grad():
            for name, layer in layers.items():
                for kind, params in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
                    key = f"base_model.model.{name}.{kind}.weight"
                    if key not in saved or saved[key].shape != params[index].shape:
                        raise StageError(
                            f"fleet member {member.name}: start adapter {folder} does not fit (tensor {key} is "
                            f"{tuple(saved[key].shape) if key in saved else 'missing'}, the member needs "
                            f"{tuple(params[index].shape)}). Give it the same lora_rank and target_modules as the "
                            "adapter it starts from.")
                    params[index].copy_(saved[key].float())

    # ------------------------------------------------------------------------------------------- passes
    def log_probs(self, batch: dict, member_of_row: torch.Tensor) -> torch.Tensor:
        """Each row's response log-probs under its member's LoRA (BASE_ONLY: the reference), [b, R] float32, in
        passes of rollout.log_prob_micro_batch_size_per_gpu rows, as the single path's old-log-prob pass."""
        from stages.train.fleet.update_loop import log_probs_in_passes

        rollout = self.cfg.actor_rollout_ref.rollout
        return log_probs_in_passes(self.model, batch, member_of_row, int(rollout.log_prob_micro_batch_size_per_gpu),
                                   rollout.temperature)

    def update(self, batch: dict, member_of_row: torch.Tensor) -> dict:
        """The RL step's actor update for every member (fleet/update_loop.py): the KL reference when
        actor.use_kl_loss, each member's warmup, ppo_epochs x mini-batches dealt per member."""
        from stages.train.fleet.update_loop import update_members

        return update_members(self.model, self.optimizer, self.cfg, batch, member_of_row, self.updates)

    # -------------------------------------------------------------------------------------- adapters out
    def peft_config(self, index: int) -> dict:
        from stages.train.fleet.lora import fleet_layers

        member = self.members[index]
        suffixes = sorted({name.rsplit(".", 1)[-1] for name, _ in fleet_layers(self.model.lm)})
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": member.lora_rank,
                "lora_alpha": member.lora_alpha, "target_modules": suffixes, "lora_dropout": 0.0, "bias": "none",
                "base_model_name_or_path": self.model_dir, "fan_in_fan_out": False, "use_rslora": False}

    def write_adapters(self, root: str, indices: list[int]) -> dict[int, str]:
        """Each listed member's adapter as a PEFT folder `<root>/<name>`; returns {index: folder}."""
        from stages.train.sync_format import write_adapter

        out = {}
        for index in indices:
            folder = Path(root) / self.members[index].name
            write_adapter(folder, self.model.adapter_tensors(index), self.peft_config(index))
            out[index] = str(folder)
        return out

    # ---------------------------------------------------------------------------------------- checkpoints
    def save_state(self, ckpt_dir: str) -> None:
        """Every member's LoRA weights and the AdamW state (all groups), whole."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        from stages.train.fleet.lora import fleet_layers

        weights = {}
        for name, layer in fleet_layers(self.model.lm):
            for kind, params in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
                for index, p in enumerate(params):
                    data = p.detach()
                    weights[f"{name}.{kind}.{index}"] = (data.full_tensor() if hasattr(data, "full_tensor") else data).cpu()
        optim = get_optimizer_state_dict(self.model, self.optimizer.adamw,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        out = Path(ckpt_dir)
        torch.save(weights, out / LORA_STATE)
        torch.save(optim, out / OPTIMIZER_STATE)
        (out / "members.json").write_text(json.dumps([m.name for m in self.members]))
        (out / UPDATES_STATE).write_text(json.dumps({m.name: n for m, n in zip(self.members, self.updates)}))

    def load_state(self, ckpt_dir: str) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        from stages.train.fleet.lora import fleet_layers

        src = Path(ckpt_dir)
        saved_names = json.loads((src / "members.json").read_text())
        if saved_names != [m.name for m in self.members]:
            raise StageError(f"Checkpoint {src} holds the members {saved_names}, this fleet has "
                             f"{[m.name for m in self.members]}. Resume with the fleet config that wrote it, or "
                             "start fresh (--force).")
        if (src / UPDATES_STATE).is_file():  # checkpoints written before warmup and shuffle were per member lack it
            counts = json.loads((src / UPDATES_STATE).read_text())
            self.updates = [int(counts.get(m.name, 0)) for m in self.members]
        weights = torch.load(src / LORA_STATE, weights_only=True)
        with torch.no_grad():
            for name, layer in fleet_layers(self.model.lm):
                for kind, params in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
                    for index, p in enumerate(params):
                        whole = weights[f"{name}.{kind}.{index}"]
                        local = p.data.to_local() if hasattr(p.data, "to_local") else p.data
                        local.copy_(whole[: local.shape[0]])  # world size 1: the shard is the whole tensor
        saved_optim = torch.load(src / OPTIMIZER_STATE, weights_only=True)
        # strict=False: a member that never stepped (failed before its first update) has no saved state
        set_optimizer_state_dict(self.model, self.optimizer.adamw, saved_optim,
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        # Loading first gives every parameter a state (a zero-gradient AdamW step at lr 0); a member that had none
        # must have none again, or its step count would read 1 (measured: it did, before this)
        for name, param in self.model.named_parameters():
            if param.requires_grad and name not in saved_optim["state"]:
                self.optimizer.adamw.state.pop(param, None)

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
