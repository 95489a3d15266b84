"""The fleet's actor update for one RL step: what ActorWorker.update_actor does around its optimizer steps,
per member.

- KL loss (actor.use_kl_loss): the reference log-probs come from the fleet model itself with every row routed
  to BASE_ONLY (adapters off, the base: the shared reference policy), in the worker, before any step.
- Learning-rate warmup: the single path's LambdaLR (linear over optim.lr_warmup_steps updates, then constant)
  counts update_actor calls; here each member counts its own updates (RL steps in which it had rows), so a
  member that joins late or skips a step warms up as it would alone. The counts are checkpointed.
- Epochs and mini-batches: ppo_epochs passes, each dealing every member's rows into mini-batches as its own
  run would (fleet/mini_batches.py), shuffled with its own update count when actor.shuffle; one optimizer
  step per fleet mini-batch (fleet/update.update_step), in which each member steps on its own share only.
"""

from __future__ import annotations

import torch

from ground.errors import ConfigError
from stages.train.fleet.members import BASE_ONLY
from stages.train.fleet.mini_batches import fleet_mini_batches, member_response_widths, num_mini_batches
from stages.train.fleet.model import FleetModel, log_probs
from stages.train.fleet.update import FleetOptimizer, update_step
from stages.train.losses import masked_mean
from stages.train.micro_batching import shuffle_seed


def warmup_updates(optim_cfg) -> int:
    """Updates of linear learning-rate warmup. lr_warmup_steps_ratio needs a run length, and each member's
    depends on its own data: fleet/config.py refuses it, and this says so again for a config built elsewhere."""
    if optim_cfg.lr_warmup_steps >= 0:
        return int(optim_cfg.lr_warmup_steps)
    if optim_cfg.lr_warmup_steps_ratio > 0:
        raise ConfigError(f"actor_rollout_ref.actor.optim.lr_warmup_steps_ratio={optim_cfg.lr_warmup_steps_ratio} "
                          "in a fleet: each member's run length depends on its own data. Set "
                          "actor_rollout_ref.actor.optim.lr_warmup_steps (a number of steps) instead.")
    return 0


def warmup_factor(update: int, warmup: int) -> float:
    """The single path's schedule (actor_worker._warmup_lambda) at update number `update` (0 = the first)."""
    return min(1.0, (update + 1) / warmup) if warmup > 0 else 1.0


@torch.no_grad()
def log_probs_in_passes(model: FleetModel, batch: dict, member_of_row: torch.Tensor, rows_per_pass: int,
                        temperature: float) -> torch.Tensor:
    """fleet.model.log_probs over `rows_per_pass` rows at a time (the single path's log-prob micro-batches), [b, R]."""
    model.eval()
    parts = []
    for start in range(0, batch["input_ids"].shape[0], rows_per_pass):
        part = {k: v[start : start + rows_per_pass] for k, v in batch.items()}
        parts.append(log_probs(model, part, member_of_row[start : start + rows_per_pass], temperature))
    return torch.cat(parts).float()


def reference_log_probs(model: FleetModel, batch: dict, cfg) -> torch.Tensor:
    """The shared reference policy's log-probs: every row routed to BASE_ONLY (adapters off, the base), in
    passes of ref.log_prob_micro_batch_size_per_gpu rows, as the single path's reference pass."""
    arr = cfg.actor_rollout_ref
    everyone_base = torch.full((batch["input_ids"].shape[0],), BASE_ONLY, dtype=torch.long)
    return log_probs_in_passes(model, batch, everyone_base, int(arr.ref.log_prob_micro_batch_size_per_gpu),
                               arr.rollout.temperature)


def on_policy(cfg) -> bool:
    """The single path's on-policy shortcut applies (stages/train/trainer.py): one epoch over one mini-batch, so the
    old log-probs are the update's own forward and the step skips their pass. (A KL penalty in the reward and
    rollout correction's bypass mode, which turn it off there, are refused in a fleet.)"""
    actor = cfg.actor_rollout_ref.actor
    return int(actor.ppo_epochs) == 1 and num_mini_batches(cfg.data.train_batch_size, actor.ppo_mini_batch_size) == 1


def update_members(model: FleetModel, optimizer: FleetOptimizer, cfg, batch: dict, member_of_row: torch.Tensor,
                   updates: list[int]) -> dict:
    """All members' actor updates for one RL step. cfg: the fleet's shared Config; updates: each member's update
    count so far, advanced here for the members with rows. Returns per-member metrics `fleet/<name>/...`: the
    mean over its optimizer steps of pg_loss, entropy, kl_loss, grad_norm; its lr, tokens (in the batch),
    optimizer_steps and kl_ref (old against reference log-probs)."""
    arr = cfg.actor_rollout_ref
    actor = arr.actor
    members = model.members
    n_members = len(members)
    member_of_row = member_of_row.cpu()
    reuse_forward_as_old = "old_log_probs" not in batch
    if reuse_forward_as_old and not on_policy(cfg):
        raise ValueError("the batch has no old_log_probs, but ppo_epochs x mini-batches > 1: the weights move "
                         "between mini-batches, so the old log-probs must come from the pass before the update")
    if actor.use_kl_loss:
        batch = {**batch, "ref_log_probs": reference_log_probs(model, batch, cfg)}
    widths = member_response_widths(batch, member_of_row, n_members)
    stepping = sorted(set(member_of_row.tolist()) - {BASE_ONLY})
    warmup = warmup_updates(actor.optim)
    for index, group in enumerate(optimizer.adamw.param_groups):
        group["lr"] = members[index].lr * warmup_factor(updates[index], warmup)

    mini_batches = num_mini_batches(cfg.data.train_batch_size, actor.ppo_mini_batch_size)
    budget = actor.ppo_max_token_len_per_gpu if actor.use_dynamic_bsz else None
    steps: list[dict] = []
    for epoch in range(int(actor.ppo_epochs)):
        seeds = [shuffle_seed(cfg.trainer.seed, updates[m], epoch) for m in range(n_members)]
        for rows in fleet_mini_batches(member_of_row, n_members, mini_batches, shuffle=actor.shuffle, seeds=seeds):
            mini_batch = {k: v.index_select(0, rows.to(v.device)) for k, v in batch.items()}
            steps.append(update_step(model, optimizer, mini_batch, member_of_row[rows], actor,
                                     micro_batch_rows=int(actor.ppo_micro_batch_size_per_gpu),
                                     temperature=arr.rollout.temperature, trim=arr.model.use_remove_padding,
                                     max_tokens=budget, widths=widths,
                                     reuse_forward_as_old=reuse_forward_as_old))
    for m in stepping:
        updates[m] += 1
    return _member_metrics(optimizer, batch, member_of_row, steps, stepping)


def _member_metrics(optimizer: FleetOptimizer, batch: dict, member_of_row: torch.Tensor, steps: list[dict],
                    stepping: list[int]) -> dict:
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for step in steps:
        for key, value in step.items():
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
    metrics = {key: sums[key] / counts[key] for key in sums}
    mask = batch["response_mask"]
    for m in stepping:
        name = optimizer.members[m].name
        own = (member_of_row == m).nonzero().squeeze(-1).to(mask.device)
        metrics[f"fleet/{name}/tokens"] = float(mask[own].sum())
        metrics[f"fleet/{name}/optimizer_steps"] = float(counts.get(f"fleet/{name}/grad_norm", 0))
        metrics[f"fleet/{name}/lr"] = float(optimizer.adamw.param_groups[m]["lr"])
        if "ref_log_probs" in batch and "old_log_probs" in batch:  # the single trainer's actor/kl_ref, per member
            metrics[f"fleet/{name}/kl_ref"] = masked_mean(batch["old_log_probs"][own] - batch["ref_log_probs"][own],
                                                          mask[own]).item()
    return metrics
