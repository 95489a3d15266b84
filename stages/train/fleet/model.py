"""The fleet's model: one base with every member's LoRA weights, and forwards over rows of mixed members.

`FleetModel.forward(..., member_of_row)` routes each row to its member's LoRA (BASE_ONLY: the base, which is
the shared reference policy) and is the FSDP2 root, as `modeling.PolicyValueModel` is for one adapter.
Rows must be grouped by member; `group_rows` gives the order that groups them, and `log_probs` sorts, runs
and puts the rows back.
"""

from __future__ import annotations

import torch
from torch import nn

from stages.train.fleet.lora import attach_fleet_lora, member_adapter_tensors
from stages.train.fleet.members import FleetMember, check_members
from stages.train.modeling import kept_positions, load_base_model, response_log_probs


class FleetModel(nn.Module):
    def __init__(self, lm: nn.Module, members: list[FleetMember], target_modules: str | list[str], seed: int):
        super().__init__()
        check_members(members)
        self.lm = lm
        self.members = list(members)
        self.routing = attach_fleet_lora(lm, self.members, target_modules, seed)

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.lm.model.layers)

    def adapter_tensors(self, member: int) -> dict[str, torch.Tensor]:
        """Member `member`'s LoRA tensors under PEFT's saved keys, whole (a collective under FSDP)."""
        return member_adapter_tensors(self.lm, member)

    def forward(self, input_ids, attention_mask, position_ids, member_of_row: torch.Tensor,
                logits_to_keep: int = 0, touch: list[int] | None = None) -> torch.Tensor:
        """Logits [b, T or logits_to_keep, V]; member_of_row [b] grouped by member (see `group_rows`)."""
        self.routing.route(member_of_row, touch)
        keep = kept_positions(input_ids.shape[1], logits_to_keep, input_ids.device)
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False, logits_to_keep=keep).logits


def build_fleet_model(model_dir: str, members: list[FleetMember], target_modules: str | list[str], *,
                      seed: int, dtype: torch.dtype, gradient_checkpointing: bool = False) -> FleetModel:
    """Base model (whole, in host memory) + every member's LoRA, float32 trainable weights, the base frozen."""
    lm = load_base_model(model_dir, dtype, gradient_checkpointing)
    return FleetModel(lm, members, target_modules, seed)


def shard_fleet_model(model: FleetModel, **fully_shard_kwargs) -> FleetModel:
    """FSDP2 as the actor does it: one unit per decoder layer (its members' LoRA weights shard with it), then the
    root for embeddings, norm and lm_head (and lm_head's LoRA weights)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.decoder_layers():
        fully_shard(layer, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


def group_rows(member_of_row: torch.Tensor) -> torch.Tensor:
    """The row order that puts each member's rows together (BASE_ONLY first), stable within a member."""
    return torch.sort(member_of_row, stable=True).indices


@torch.no_grad()
def log_probs(model: FleetModel, batch: dict, member_of_row: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Response log-probs [b, R] of each row under its member's LoRA (BASE_ONLY rows: the reference policy),
    in the batch's own row order."""
    member_of_row = member_of_row.cpu()
    order = group_rows(member_of_row)
    on_device = order.to(batch["input_ids"].device)
    rows = {k: batch[k].index_select(0, on_device)
            for k in ("input_ids", "attention_mask", "position_ids", "responses")}
    r = rows["responses"].shape[1]
    logits = model(rows["input_ids"], rows["attention_mask"], rows["position_ids"], member_of_row[order],
                   logits_to_keep=r + 1)
    sorted_lp, _ = response_log_probs(logits, rows["responses"], temperature)
    out = torch.empty_like(sorted_lp)
    out[on_device] = sorted_lp
    return out
