"""One forward of each prompt for all of its sampled responses (`actor_rollout_ref.model.share_prompt_forward`).

GRPO-style batches hold n responses per prompt. The padded layout (batch.py) computes the prompt n times; here
the rows of a micro-batch that share a prompt become one row:

    [left pad | prompt (p) | response 1 | response 2 | ... | response k | right pad]

with a 4D attention mask in which every response attends to the prompt and to its own earlier tokens only, and
position ids that restart at p for every response. Each response token then sees exactly the keys, values and
positions it sees in its own padded row, so log-probs, losses and gradients are those of the padded computation
(up to float rounding); the gradient through the shared prompt is the sum of what the n copies would get.

The saving is the prompt tokens: the default demo's micro-batches (44-token prompt, 8 responses of ~12 tokens)
compute ~30% of the tokens of the padded layout. The mask is dense ([G, 1, L, L] for G prompts of packed length
L), so the setting suits short prompts and responses (CPU runs, tests); on GPUs with long sequences the
padded layout with flash attention is the better choice, and the setting is off by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packed:
    input_ids: torch.Tensor  # [G, L]
    position_ids: torch.Tensor  # [G, L]
    attention_mask: torch.Tensor  # [G, 1, L, L] additive (0 = attend, dtype minimum = masked)
    prompt_end: int  # column P - 1: the last prompt token of every packed row (prompts are left-padded to P)
    row_group: torch.Tensor  # [b] the packed row holding each original row
    predictor: torch.Tensor  # [b, W] column (minus prompt_end) whose logits predict each response token

    @property
    def logits_to_keep(self) -> int:
        return self.input_ids.shape[1] - self.prompt_end


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[list[int]]:
    """Rows with the same real prompt tokens, in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for row in range(prompt_ids.shape[0]):
        key = tuple(prompt_ids[row][prompt_mask[row].bool()].tolist())
        groups.setdefault(key, []).append(row)
    return list(groups.values())


def group_order(batch: dict) -> list[int]:
    """Row indices with each prompt's rows adjacent, so micro-batches cut in this order keep groups whole."""
    width = batch["responses"].shape[1]
    cols = batch["input_ids"].shape[1] - width
    groups = prompt_groups(batch["input_ids"][:, :cols], batch["attention_mask"][:, :cols])
    return [row for group in groups for row in group]


def pack(data: dict, mask_dtype: torch.dtype, pad_id: int = 0) -> Packed:
    """The micro-batch `data` (batch.py's layout, possibly trimmed) as one packed row per distinct prompt."""
    ids, att = data["input_ids"].cpu(), data["attention_mask"].cpu()
    n_rows, width = data["responses"].shape
    cols = ids.shape[1] - width
    groups = prompt_groups(ids[:, :cols], att[:, :cols])
    prompt_len = att[:, :cols].sum(-1).tolist()
    resp_len = att[:, cols:].sum(-1).tolist()
    p = max(1, max(prompt_len))
    length = p + max(sum(resp_len[r] for r in rows) for rows in groups)

    input_ids = torch.full((len(groups), length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(groups), length), dtype=torch.long)
    allowed = torch.zeros((len(groups), length, length), dtype=torch.bool)
    causal = torch.ones((length, length), dtype=torch.bool).tril()
    row_group = torch.zeros(n_rows, dtype=torch.long)
    predictor = torch.zeros((n_rows, width), dtype=torch.long)  # column 0 of the kept logits is position p - 1
    for g, rows in enumerate(groups):
        plen = prompt_len[rows[0]]
        start = p - plen
        input_ids[g, start:p] = ids[rows[0], cols - plen : cols]
        position_ids[g, start:p] = torch.arange(plen)
        allowed[g, start:p, start:p] = causal[:plen, :plen]
        col = p
        for r in rows:
            n = resp_len[r]
            input_ids[g, col : col + n] = ids[r, cols : cols + n]
            position_ids[g, col : col + n] = torch.arange(plen, plen + n)
            allowed[g, col : col + n, start:p] = True
            allowed[g, col : col + n, col : col + n] = causal[:n, :n]
            row_group[r] = g
            # response token t is predicted at the position before it: the prompt's last token for t = 0
            if n > 1:
                predictor[r, 1:n] = torch.arange(col, col + n - 1) - (p - 1)
            col += n
        allowed[g, :start, :start] |= torch.eye(start, dtype=torch.bool)  # pads see themselves: no empty rows
        allowed[g, col:, col:] |= torch.eye(length - col, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill_(~allowed, torch.finfo(mask_dtype).min)
    device = data["input_ids"].device
    return Packed(input_ids.to(device), position_ids.to(device), mask.unsqueeze(1).to(device), p - 1,
                  row_group.to(device), predictor.to(device))


def response_logits(kept_logits: torch.Tensor, packed: Packed) -> torch.Tensor:
    """[G, L - P + 1, V] logits of the packed rows -> [b, W, V]: the logits predicting each original row's
    response tokens, in the padded layout's order."""
    return kept_logits[packed.row_group.unsqueeze(-1), packed.predictor]


def forward_response_logits(model, data: dict, mode: str, mask_dtype: torch.dtype) -> torch.Tensor:
    """`model` (PolicyValueModel) over the packed micro-batch -> the logits predicting each response token,
    [b, W, V] in `data`'s row order (as the padded layout's logits[:, -W-1:-1])."""
    packed = pack(data, mask_dtype)
    logits = model(packed.input_ids, packed.attention_mask, packed.position_ids, mode=mode,
                   logits_to_keep=packed.logits_to_keep)
    return response_logits(logits, packed)
