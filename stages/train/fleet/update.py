"""One actor update for every member at once: per-member losses, per-member optimizer groups.

The promise: a member trained in a fleet gets the update it would get trained alone on the same rows.
- Loss: each member's policy loss is the token-mean over ITS OWN tokens in the mini-batch (N_m), and the
  members' losses are summed. Rows never interact in the forward and member m's weights touch only its rows,
  so d(sum)/d(theta_m) = d(loss_m)/d(theta_m): the gradient a lone run computes. A global token-mean would
  scale each member's gradient by N_m / N (and its Adam moments with it).
- Micro-batches: a token of member m weighs 1 / N_m wherever it lands, so the micro-batches' losses sum to
  the mini-batch's loss however rows are grouped.
- Optimizer: one AdamW with a parameter group per member (its own lr, weight decay, betas); each member's
  gradient is clipped by its own norm. A member without a response token in the mini-batch never gets a
  gradient (its rows are left out of the forward), and AdamW skips a parameter whose grad is None: its
  weights, moments and step count stay bit for bit. A member whose gradient is not finite skips alone.

Only loss_agg_mode token-mean (the default) in this slice; KL loss, entropy bonus and rollout correction are
not wired yet.
"""

from __future__ import annotations

import math

import torch

from ground.errors import ConfigError
from stages.train.fleet.lora import member_parameters
from stages.train.fleet.members import BASE_ONLY
from stages.train.fleet.model import FleetModel, group_rows
from stages.train.losses import get_policy_loss_fn
from stages.train.micro_batching import take
from stages.train.modeling import response_log_probs


class FleetOptimizer:
    """One AdamW over every member's LoRA weights, a parameter group per member."""

    def __init__(self, model: FleetModel):
        self.members = model.members
        groups = [{"params": member_parameters(model, i), "lr": m.lr, "weight_decay": m.weight_decay,
                   "betas": tuple(m.betas), "member": m.name} for i, m in enumerate(self.members)]
        self.adamw = torch.optim.AdamW(groups)

    def zero_grad(self) -> None:
        # set_to_none is the skip: a zeroed (not None) gradient would make AdamW decay and count a step
        self.adamw.zero_grad(set_to_none=True)

    def step(self) -> dict[str, float]:
        """Clip each member's gradient by its own norm, then one AdamW step over the members that have one.
        Returns {member name: grad norm before clipping} for the members that were stepped."""
        norms = {}
        for group, member in zip(self.adamw.param_groups, self.members):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            norm = torch.nn.utils.clip_grad_norm_(params, member.grad_clip)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            norm = float(norm)
            if not math.isfinite(norm):  # this member skips the step; the others go on
                for p in params:
                    p.grad = None
            norms[member.name] = norm
        self.adamw.step()
        return norms


def member_token_counts(member_of_row: torch.Tensor, response_mask: torch.Tensor, n_members: int) -> torch.Tensor:
    """Response tokens of each member in these rows [n_members] (BASE_ONLY rows count for no one)."""
    counts = torch.zeros(n_members, dtype=torch.float64, device=response_mask.device)
    member_of_row = member_of_row.to(response_mask.device)
    own = member_of_row != BASE_ONLY
    counts.index_add_(0, member_of_row[own], response_mask[own].sum(-1).double())
    return counts


def members_on_any_rank(tokens: torch.Tensor) -> list[int]:
    """Members with a response token on this rank or any other. Every rank must step the same members: under
    FSDP each holds a shard of every member's weights and AdamW state, and a member stepped on one rank but not
    another would leave its shards at different step counts. A member present only elsewhere gets a zero
    gradient here (FleetRouting.touch). World size > 1 has not run yet."""
    import torch.distributed as dist

    present = (tokens > 0).to(torch.float32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(present, op=dist.ReduceOp.MAX)
    return [m for m in range(len(present)) if present[m] > 0]


def update_step(model: FleetModel, optimizer: FleetOptimizer, mini_batch: dict, member_of_row: torch.Tensor,
                actor_cfg, *, micro_batch_rows: int, temperature: float = 1.0, trim: bool = True) -> dict:
    """One optimizer step over `mini_batch` (the trainer's tensors + advantages, old_log_probs), whose row i
    belongs to member member_of_row[i]. Micro-batches are consecutive runs of `micro_batch_rows` rows, each
    grouped by member inside. Returns metrics, per member under `fleet/<name>/...`."""
    if actor_cfg.loss_agg_mode != "token-mean":
        raise ConfigError(f"actor_rollout_ref.actor.loss_agg_mode={actor_cfg.loss_agg_mode!r}: fleet training "
                          "normalises each member's loss over its own tokens (token-mean) and supports only that "
                          "mode so far. Set it to token-mean.")
    policy_loss = get_policy_loss_fn(actor_cfg.policy_loss.loss_mode)
    n_members = len(model.members)
    member_of_row = member_of_row.cpu()  # row bookkeeping on the host; the tensors stay on their device
    mask = mini_batch["response_mask"]
    tokens = member_token_counts(member_of_row, mask, n_members)
    present = members_on_any_rank(tokens)
    # rows of the base, and of members without a single token, carry no loss: left out of the forward
    has_tokens = (tokens > 0).tolist()  # one copy to the host, not one per row
    kept = [i for i, m in enumerate(member_of_row.tolist()) if m != BASE_ONLY and has_tokens[m]]
    model.train()
    optimizer.zero_grad()
    losses = torch.zeros(n_members, dtype=torch.float64)
    for start in range(0, len(kept), micro_batch_rows):
        rows = torch.tensor(kept[start : start + micro_batch_rows], dtype=torch.long)
        rows = rows[group_rows(member_of_row[rows])]
        micro = take(mini_batch, rows.tolist(), trim).data
        members = member_of_row[rows]
        r = micro["responses"].shape[1]
        logits = model(micro["input_ids"], micro["attention_mask"], micro["position_ids"], members,
                       logits_to_keep=r + 1, touch=present)
        log_prob, _ = response_log_probs(logits, micro["responses"], temperature)
        loss = log_prob.sum() * 0.0
        for member in members.unique().tolist():
            seg = (members == member).nonzero().squeeze(-1).to(log_prob.device)
            seg_mask = micro["response_mask"][seg]
            # per-token weight 1/N_m: "seq-mean-token-sum" of (mask/N_m) times the segment's rows is
            # sum(loss * mask) / N_m, this segment's share of member m's token-mean
            weights = seg_mask / tokens[member].to(seg_mask.dtype)
            seg_loss, _ = policy_loss(micro["old_log_probs"][seg], log_prob[seg], micro["advantages"][seg],
                                      weights, "seq-mean-token-sum", actor_cfg)
            seg_loss = seg_loss * len(seg)
            losses[member] += seg_loss.item()
            loss = loss + seg_loss
        loss.backward()
    norms = optimizer.step()
    metrics = {}
    for m in present:
        name = model.members[m].name
        metrics[f"fleet/{name}/pg_loss"] = float(losses[m])
        metrics[f"fleet/{name}/grad_norm"] = norms.get(name, float("nan"))
        metrics[f"fleet/{name}/tokens"] = float(tokens[m])
    return metrics
