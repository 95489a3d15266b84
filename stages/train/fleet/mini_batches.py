"""How a fleet batch is cut into mini-batches, and how each member's loss is normalised inside one.

The promise of the fleet update is that a member gets the update it would get trained alone on the same rows.
The single path (ActorWorker.update_actor) deals its batch of `prompts x rollout.n` rows into
`ceil(train_batch_size / ppo_mini_batch_size)` mini-batches of `ceil(rows / that)` rows each, in order or
shuffled with a seed of (trainer.seed, its update number, the epoch). A fleet member has its own rows, its own
rollout.n and its own update count, so it is dealt alone, exactly that way, and the fleet's k-th mini-batch is
the union of every member's k-th mini-batch (`fleet_mini_batches`). A member with fewer mini-batches than
another simply has no rows in the last ones: it is not stepped there, as it would not be alone.

Inside a mini-batch every loss the single path aggregates (policy loss, entropy bonus, KL loss) is a weighted
sum of per-token values; `member_token_weights` gives each token of member m the weight its loss_agg_mode gives
it when m's rows of the mini-batch are aggregated alone:

    token-mean               mask / N_m                 N_m: m's response tokens in the mini-batch
    seq-mean-token-mean      mask / (len_i * S_m)       len_i: row i's tokens; S_m: m's rows with a token
    seq-mean-token-sum       mask / B_m                 B_m: m's rows in the mini-batch (empty ones too)
    seq-mean-token-sum-norm  mask / (B_m * R_m)         R_m: the response width of m's own batch

R_m is the width m's batch would be padded to alone (its longest response of the RL step, at least 1), not the
fleet batch's width, which other members' long answers set (`member_response_widths`).
"""

from __future__ import annotations

import math

import torch

from ground.errors import ConfigError
from stages.train.fleet.members import BASE_ONLY
from stages.train.losses import check_loss_agg_mode
from stages.train.micro_batching import mini_batch_rows


def num_mini_batches(train_batch_size: int, ppo_mini_batch_size: int) -> int:
    """The single trainer's count (trainer.py): mini-batches per RL step, both sizes in prompts."""
    return math.ceil(train_batch_size / ppo_mini_batch_size)


def fleet_mini_batches(member_of_row: torch.Tensor, n_members: int, mini_batches: int, *, shuffle: bool,
                       seeds: list[int]) -> list[torch.Tensor]:
    """Row indices (into the fleet batch) of each fleet mini-batch: member m's rows, in batch order, dealt as
    `micro_batching.mini_batch_rows(rows_m, ceil(rows_m / mini_batches), shuffle, seeds[m])` deals them in its
    own run; mini-batch k holds every member's k-th share. BASE_ONLY rows belong to no mini-batch."""
    shares: list[list[torch.Tensor]] = []
    for member in range(n_members):
        rows = (member_of_row == member).nonzero().squeeze(-1)
        if len(rows) == 0:
            continue
        size = math.ceil(len(rows) / mini_batches)
        shares.append([rows[part] for part in mini_batch_rows(len(rows), size, shuffle=shuffle, seed=seeds[member])])
    count = max((len(s) for s in shares), default=0)
    return [torch.cat([s[k] for s in shares if k < len(s)]) for k in range(count)]


def response_lengths(batch: dict) -> torch.Tensor:
    """Real response tokens per row [B] (the attention mask over the right-padded response columns)."""
    r = batch["responses"].shape[1]
    return batch["attention_mask"][:, -r:].sum(-1)


def member_response_widths(batch: dict, member_of_row: torch.Tensor, n_members: int) -> torch.Tensor:
    """[n_members]: the response width each member's rows alone would be padded to (batch.build_tensors pads to
    the longest response, at least 1)."""
    lengths = response_lengths(batch).cpu()
    widths = torch.ones(n_members, dtype=torch.float64)
    for member in range(n_members):
        own = lengths[member_of_row == member]
        if len(own):
            widths[member] = max(1, int(own.max()))
    return widths


class MemberNormalisers:
    """Each member's counts over one mini-batch, the denominators of its loss_agg_mode (see the module doc)."""

    def __init__(self, mini_batch: dict, member_of_row: torch.Tensor, n_members: int, widths: torch.Tensor):
        mask = mini_batch["response_mask"].detach().cpu().double()
        per_row = mask.sum(-1)
        own = member_of_row != BASE_ONLY
        members = member_of_row[own]
        self.tokens = torch.zeros(n_members, dtype=torch.float64).index_add_(0, members, per_row[own])
        self.rows_with_tokens = torch.zeros(n_members, dtype=torch.float64).index_add_(
            0, members, (per_row[own] > 0).double())
        self.rows = torch.zeros(n_members, dtype=torch.float64).index_add_(0, members, torch.ones(len(members),
                                                                                                    dtype=torch.float64))
        self.widths = widths.double()


def member_token_weights(mode: str, member: int, seg_mask: torch.Tensor, norm: MemberNormalisers) -> torch.Tensor:
    """Per-token weights [s, R] of member `member`'s rows `seg_mask` ([s, R] response mask) such that
    sum(values * weights) over all of m's micro-batch segments is agg_loss(values, m's mask, mode) over m's rows
    of the mini-batch."""
    if mode == "token-mean":
        return seg_mask / float(norm.tokens[member])
    if mode == "seq-mean-token-mean":
        lengths = seg_mask.sum(-1, keepdim=True).clamp(min=1.0)
        return seg_mask / lengths / float(norm.rows_with_tokens[member])
    if mode == "seq-mean-token-sum":
        return seg_mask / float(norm.rows[member])
    if mode == "seq-mean-token-sum-norm":
        return seg_mask / float(norm.rows[member] * norm.widths[member])
    check_loss_agg_mode(mode)  # a registered mode this table does not know yet: say so by name
    raise ConfigError(f"actor_rollout_ref.actor.loss_agg_mode={mode!r} has no per-member weighting in fleet "
                      "training (stages/train/fleet/mini_batches.member_token_weights). Use token-mean, "
                      "seq-mean-token-mean, seq-mean-token-sum or seq-mean-token-sum-norm.")
