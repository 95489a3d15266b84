"""Micro-batches that skip padding: sort by length, bucket, trim each bucket to its own longest row.

A worker's slice of a batch is padded to the longest prompt and the longest response of the whole batch
(batch.py's layout: prompt left-padded to P | response right-padded to R). Computing on those pad columns is
waste; with `actor_rollout_ref.model.use_remove_padding=True` the rows are sorted by real length, cut into
micro-batches of similar length, and each micro-batch is trimmed to the columns some row of it uses. Outputs
come back in the original row order, zero-filled beyond each row's trimmed width (masked positions).

With `use_dynamic_bsz=True` micro-batches are cut by a token budget (`ppo_max_token_len_per_gpu`, counting
rows x trimmed width, which is what the forward computes) instead of a row count, as in verl.

Full packing (all rows concatenated into one row, separated by position_ids) would skip padding entirely but
needs a varlen attention kernel (flash-attention); the SDPA path used on CPU would attend across sequences.

So that the loss does not depend on how rows were grouped, each micro-batch's loss is weighted by its share of
the mini-batch under the loss aggregation mode (`loss_weight`): summed, the weighted micro-batch losses equal
the loss of the whole mini-batch computed in one padded pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FULL_SEQUENCE_KEYS = ("input_ids", "attention_mask", "position_ids")


@dataclass
class MicroBatch:
    """Rows `rows` (indices into the mini-batch) of a batch, trimmed to `width` response columns."""

    data: dict[str, torch.Tensor]
    rows: torch.Tensor  # [b] long, positions in the batch the micro-batch came from
    width: int  # response columns kept (<= R)
    dummy: bool = False  # a fully masked stand-in so every rank runs the same number of micro-batches


def row_lengths(batch: dict) -> torch.Tensor:
    """Real tokens per row (prompt + response) [B]."""
    return batch["attention_mask"].sum(-1)


def plan_rows(lengths: list[int], *, max_rows: int, max_tokens: int | None, sort: bool,
              order: list[int] | None = None) -> list[list[int]]:
    """Groups of row indices. Rows taken in `order` when given (shared_prompt.group_order keeps a prompt's rows
    together), else sorted longest first when `sort`; cut every `max_rows` rows, or, with `max_tokens`, before a
    row would make rows x longest-row exceed the budget (a row longer than the budget goes alone)."""
    if order is None:
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else list(range(len(lengths)))
    groups: list[list[int]] = []
    for i in order:
        if groups:
            group = groups[-1]
            longest = max(lengths[j] for j in group + [i])
            fits = (len(group) + 1) * longest <= max_tokens if max_tokens else len(group) < max_rows
            if fits:
                group.append(i)
                continue
        groups.append([i])
    return groups


def split_to_count(groups: list[list[int]], count: int) -> list[list[int]]:
    """`groups` cut further until there are `count` of them (another rank needs that many micro-batches and FSDP
    needs every rank to run the same number): the group with the most rows is halved, so no group grows past
    its budget; empty groups once every group is down to one row."""
    groups = [list(g) for g in groups]
    while len(groups) < count:
        biggest = max(range(len(groups)), key=lambda k: len(groups[k])) if groups else None
        if biggest is None or len(groups[biggest]) < 2:
            groups.append([])
            continue
        group = groups[biggest]
        half = len(group) // 2
        groups[biggest : biggest + 1] = [group[:half], group[half:]]
    return groups


def take(batch: dict, rows: list[int], trim: bool) -> MicroBatch:
    """The micro-batch of `rows`; trimmed to the prompt and response columns some row uses when `trim`."""
    n_resp = batch["responses"].shape[1]
    index = torch.tensor(rows, dtype=torch.long)
    dummy = not rows
    if dummy:  # a copy of row 0 with nothing to learn from: it joins FSDP's collectives, adds nothing
        index = torch.tensor([0], dtype=torch.long)
    data = {k: v.index_select(0, index.to(v.device)) for k, v in batch.items()}
    if dummy:
        data["response_mask"] = torch.zeros_like(data["response_mask"])
    width = n_resp
    if trim:
        prompt_cols = data["input_ids"].shape[1] - n_resp
        prompt_keep = max(1, int(data["attention_mask"][:, :prompt_cols].sum(-1).max()))
        width = max(1, int(data["attention_mask"][:, prompt_cols:].sum(-1).max()))
        lo, hi = prompt_cols - prompt_keep, prompt_cols + width
        for key, value in data.items():
            if key in FULL_SEQUENCE_KEYS:
                data[key] = value[:, lo:hi]
            elif value.dim() >= 2 and value.shape[1] == n_resp:
                data[key] = value[:, :width]
    return MicroBatch(data, index, width, dummy)


def scatter_rows(parts: list[tuple[MicroBatch, torch.Tensor]], n_rows: int, n_cols: int) -> torch.Tensor:
    """Per-micro-batch outputs [b, width] back into one [n_rows, n_cols] tensor in the original row order."""
    first = parts[0][1]
    out = torch.zeros((n_rows, n_cols), dtype=first.dtype)
    for mb, value in parts:
        if not mb.dummy:
            out[mb.rows, : value.shape[1]] = value.to(out.dtype)
    return out


def loss_weight(mb: MicroBatch, mini_mask: torch.Tensor, loss_agg_mode: str) -> float:
    """This micro-batch's share of the mini-batch loss under `loss_agg_mode` (see losses.agg_loss).

    mini_mask is the whole mini-batch's response_mask [B, R] on this rank. Summing `agg(mb) * weight` over the
    micro-batches gives `agg(mini-batch)` exactly for every mode."""
    if mb.dummy:
        return 0.0
    mask = mb.data["response_mask"]
    if loss_agg_mode == "token-mean":
        return float(mask.sum()) / max(float(mini_mask.sum()), 1.0)
    if loss_agg_mode == "seq-mean-token-mean":
        return float((mask.sum(-1) > 0).sum()) / max(float((mini_mask.sum(-1) > 0).sum()), 1.0)
    if loss_agg_mode == "seq-mean-token-sum":
        return mask.shape[0] / mini_mask.shape[0]
    if loss_agg_mode == "seq-mean-token-sum-norm":  # sum / (B*T): T is the trimmed width here, R there
        return (mask.shape[0] * mask.shape[1]) / (mini_mask.shape[0] * mini_mask.shape[1])
    raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}")


def mini_batch_rows(n_rows: int, size: int, *, shuffle: bool, seed: int) -> list[torch.Tensor]:
    """Row indices of each mini-batch of `size` rows: in order, or, with `shuffle` (verl's `actor.shuffle`), a
    permutation drawn from `seed` (the same seed deals the same mini-batches; see `shuffle_seed`)."""
    if shuffle:
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(n_rows)
    return list(order.split(size))


def shuffle_seed(seed: int, update: int, epoch: int) -> int:
    """A seed of its own for each (trainer.seed, update number, PPO epoch): every epoch deals new mini-batches,
    and a rerun (or a resume, whose scheduler restores the update number) deals the same ones."""
    return (seed * 1_000_003 + update * 1_009 + epoch) % (2**63)
