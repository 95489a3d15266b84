"""One actor update for every member at once: per-member losses, per-member optimizer groups.

The promise: a member trained in a fleet gets the update it would get trained alone on the same rows.
- Loss: each member's loss is aggregated over ITS OWN rows of the mini-batch (token-mean: over its N_m
  tokens), and the members' losses are summed. Rows never interact in the forward and member m's weights
  touch only its rows, so d(sum)/d(theta_m) = d(loss_m)/d(theta_m): the gradient a lone run computes. A global
  token-mean would scale each member's gradient by N_m / N (and its Adam moments with it).
- Micro-batches: a token of member m carries its weight for the whole mini-batch (1 / N_m for token-mean)
  wherever it lands, so the micro-batches' losses sum to the mini-batch's loss however rows are grouped.
- Optimizer: one AdamW with a parameter group per member (its own lr, weight decay, betas); each member's
  gradient is clipped by its own norm. A member without a response token in the mini-batch never gets a
  gradient (its rows are left out of the forward), and AdamW skips a parameter whose grad is None: its
  weights, moments and step count stay bit for bit. A member whose gradient is not finite skips alone.

Every loss the single path's update adds is here, per member over its own tokens: the policy loss, the
entropy bonus (actor.entropy_coeff) and the KL loss against the shared reference (actor.use_kl_loss: the
reference log-probs are the base's, adapters off, computed by the worker), each aggregated with the member's
weights for any loss_agg_mode (fleet/mini_batches.py). Mini-batches, epochs and warmup are
fleet/update_loop.py's; this module is one optimizer step. Rollout correction is refused in a fleet
(fleet/config.py): the fleet's rollout does not keep the engine's log-probs.
"""

from __future__ import annotations

import math

import torch

from stages.train.fleet.lora import member_parameters
from stages.train.fleet.members import BASE_ONLY
from stages.train.fleet.mini_batches import MemberNormalisers, member_response_widths, member_token_weights
from stages.train.fleet.model import FleetModel, group_rows
from stages.train.kl import kl_penalty
from stages.train.losses import check_loss_agg_mode, entropy_from_logits, get_policy_loss_fn
from stages.train.micro_batching import plan_rows, row_lengths, take
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
        stepped = []
        for group, member in zip(self.adamw.param_groups, self.members):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            norm = torch.nn.utils.clip_grad_norm_(params, member.grad_clip)
            stepped.append((member.name, params, norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        norms = {}
        for (name, params, _), norm in zip(stepped, _to_host([n for _, _, n in stepped])):
            if not math.isfinite(norm):  # this member skips the step; the others go on
                for p in params:
                    p.grad = None
            norms[name] = norm
        self.adamw.step()
        return norms


def _to_host(scalars: list[torch.Tensor]) -> list[float]:
    """One-element tensors as floats in one transfer: on a GPU each `.item()` waits for the queue, so reading
    them one by one made the wait grow with the number of members."""
    return torch.stack([t.reshape(()).float() for t in scalars]).tolist() if scalars else []


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
                actor_cfg, *, micro_batch_rows: int, temperature: float = 1.0, trim: bool = True,
                max_tokens: int | None = None, widths: torch.Tensor | None = None,
                reuse_forward_as_old: bool = False) -> dict:
    """One optimizer step over `mini_batch` (the trainer's tensors + advantages, old_log_probs, and
    ref_log_probs when actor.use_kl_loss), whose row i belongs to member member_of_row[i].

    reuse_forward_as_old: the on-policy shortcut of the single path (one epoch over one mini-batch: the weights
    have not moved since the rollout), where the old log-probs are this forward's own, detached, and
    `mini_batch` needs no old_log_probs.

    Micro-batches as the single path cuts them (micro_batching.plan_rows: `micro_batch_rows` rows, or a token
    budget `max_tokens` with dynamic batch size; sorted by length when `trim`), each grouped by member inside;
    grouping changes no gradient, since every token carries its member's weight for the whole mini-batch.
    widths: each member's response width alone (seq-mean-token-sum-norm; default: the longest of its rows
    here). Returns metrics per member under `fleet/<name>/...` for the members that stepped."""
    mode = actor_cfg.loss_agg_mode
    check_loss_agg_mode(mode)
    policy_loss = get_policy_loss_fn(actor_cfg.policy_loss.loss_mode)
    entropy_coeff = float(actor_cfg.entropy_coeff)
    use_kl = bool(actor_cfg.use_kl_loss)
    if use_kl and "ref_log_probs" not in mini_batch:
        raise ValueError("actor.use_kl_loss is on but the mini-batch has no ref_log_probs; FleetWorker.update "
                         "computes them (all rows routed to BASE_ONLY) before the mini-batches")
    n_members = len(model.members)
    member_of_row = member_of_row.cpu()  # row bookkeeping on the host; the tensors stay on their device
    if widths is None:
        widths = member_response_widths(mini_batch, member_of_row, n_members)
    norm = MemberNormalisers(mini_batch, member_of_row, n_members, widths)
    present = members_on_any_rank(norm.tokens)
    # rows of the base, and rows without a response token (weight 0 in every mode), carry no loss: left out of
    # the forward, so a member without a single token gets no gradient at all
    row_tokens = mini_batch["response_mask"].sum(-1).tolist()
    kept = [i for i, m in enumerate(member_of_row.tolist()) if m != BASE_ONLY and row_tokens[i] > 0]
    lengths = row_lengths(mini_batch).tolist()
    groups = plan_rows([lengths[i] for i in kept], max_rows=micro_batch_rows, max_tokens=max_tokens, sort=trim)
    model.train()
    optimizer.zero_grad()
    sums = {key: torch.zeros(n_members, dtype=torch.float64) for key in ("pg_loss", "entropy", "kl_loss")}
    pending: list[tuple[str, int, torch.Tensor]] = []  # (metric, member, its value on the device)
    for group in groups:
        rows = torch.tensor([kept[j] for j in group], dtype=torch.long)
        rows = rows[group_rows(member_of_row[rows])]
        micro = take(mini_batch, rows.tolist(), trim).data
        members = member_of_row[rows]
        r = micro["responses"].shape[1]
        logits = model(micro["input_ids"], micro["attention_mask"], micro["position_ids"], members,
                       logits_to_keep=r + 1, touch=present)
        log_prob, resp_logits = response_log_probs(logits, micro["responses"], temperature)
        # the entropy is always a metric; it needs autograd only when entropy_coeff puts it in the loss
        with torch.set_grad_enabled(bool(entropy_coeff) and torch.is_grad_enabled()):
            entropy = entropy_from_logits(resp_logits)
        del resp_logits
        loss = log_prob.sum() * 0.0
        for member in members.unique().tolist():
            seg = (members == member).nonzero().squeeze(-1).to(log_prob.device)
            seg_mask = micro["response_mask"][seg]
            weights = member_token_weights(mode, member, seg_mask, norm).to(seg_mask.dtype)
            # "seq-mean-token-sum" of the weights, times the segment's rows, is sum(loss * weights): this
            # segment's share of member m's aggregated loss over the mini-batch
            old = log_prob[seg].detach() if reuse_forward_as_old else micro["old_log_probs"][seg]
            pg, _ = policy_loss(old, log_prob[seg], micro["advantages"][seg], weights,
                                "seq-mean-token-sum", actor_cfg)
            pg = pg * len(seg)
            seg_loss = pg
            if entropy_coeff:
                seg_loss = seg_loss - entropy_coeff * (entropy[seg] * weights).sum()
            if use_kl:
                kl = (kl_penalty(log_prob[seg], micro["ref_log_probs"][seg], actor_cfg.kl_loss_type) * weights).sum()
                seg_loss = seg_loss + actor_cfg.kl_loss_coef * kl
                pending.append(("kl_loss", member, kl.detach()))
            pending.append(("pg_loss", member, pg.detach()))
            pending.append(("entropy", member, (entropy[seg].detach() * seg_mask).sum() / float(norm.tokens[member])))
            loss = loss + seg_loss
        loss.backward()
    for (key, member, _), value in zip(pending, _to_host([v for _, _, v in pending])):
        sums[key][member] += value
    norms = optimizer.step()
    metrics = {}
    for m in present:
        name = model.members[m].name
        metrics[f"fleet/{name}/pg_loss"] = float(sums["pg_loss"][m])
        metrics[f"fleet/{name}/entropy"] = float(sums["entropy"][m])
        if use_kl:
            metrics[f"fleet/{name}/kl_loss"] = float(sums["kl_loss"][m])
        metrics[f"fleet/{name}/grad_norm"] = norms.get(name, float("nan"))
        metrics[f"fleet/{name}/tokens"] = float(norm.tokens[m])
    return metrics
