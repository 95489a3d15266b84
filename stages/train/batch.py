"""Turn prompts and sampled responses into the padded tensors the actor workers consume.

Layout (as verl): input_ids [B, P+R] = prompt left-padded to P | response right-padded to R.
position_ids count real tokens only, so a left-padded prompt starts at position 0 like an unpadded one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Rollout:
    """One generation batch, flattened: row i is response i, `index[i]` its prompt's uid (the GRPO group)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    index: list[str]
    items: list[dict]  # the dataset item of each row's prompt
    finish_reasons: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    accs: list[float | None] = field(default_factory=list)
    log_probs: list[list[float]] = field(default_factory=list)  # the engine's log-prob of each sampled token

    def __len__(self) -> int:
        return len(self.response_ids)

    def select(self, rows: list[int]) -> "Rollout":
        pick = lambda xs: [xs[i] for i in rows] if xs else []  # noqa: E731
        return Rollout(pick(self.prompt_ids), pick(self.response_ids), pick(self.index), pick(self.items),
                       pick(self.finish_reasons), pick(self.scores), pick(self.accs), pick(self.log_probs))

    def extend(self, other: "Rollout") -> None:
        for name in ("prompt_ids", "response_ids", "index", "items", "finish_reasons", "scores", "accs", "log_probs"):
            getattr(self, name).extend(getattr(other, name))


def flatten_generation(items: list[dict], outputs: list[list[dict]]) -> Rollout:
    """Dataset items + the engine's n outputs per prompt -> one row per response."""
    r = Rollout([], [], [], [])
    for item, outs in zip(items, outputs):
        for out in outs:
            r.prompt_ids.append(list(item["prompt_ids"]))
            r.response_ids.append(list(out["token_ids"]) or [])
            r.index.append(str(item["uid"]))
            r.items.append(item)
            r.finish_reasons.append(out.get("finish_reason", ""))
            if "logprobs" in out:
                r.log_probs.append(list(out["logprobs"]))
    return r


def build_tensors(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Padded tensors: input_ids, attention_mask, position_ids [B, P+R]; responses, response_mask [B, R]."""
    b = len(prompt_ids)
    p = max(len(x) for x in prompt_ids)
    r = max(1, max(len(x) for x in response_ids))  # an all-empty batch still gets one (masked) position
    input_ids = torch.full((b, p + r), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, p + r), dtype=torch.long)
    response_mask = torch.zeros((b, r), dtype=torch.float32)
    for i, (prompt, resp) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, p - len(prompt) : p] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[i, p - len(prompt) : p] = 1
        if resp:
            input_ids[i, p : p + len(resp)] = torch.tensor(resp, dtype=torch.long)
            attention_mask[i, p : p + len(resp)] = 1
            response_mask[i, : len(resp)] = 1.0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "responses": input_ids[:, p:].clone(),
        "response_mask": response_mask,
    }


def padded_log_probs(log_probs: list[list[float]], width: int) -> torch.Tensor:
    """Per-token values of each response, right-padded with 0 to `width` columns: [B, width] float32."""
    out = torch.zeros((len(log_probs), width), dtype=torch.float32)
    for i, row in enumerate(log_probs):
        if row:
            out[i, : len(row)] = torch.tensor(row[:width], dtype=torch.float32)
    return out


def outcome_rewards(scores: list[float], response_mask: torch.Tensor) -> torch.Tensor:
    """Token-level rewards [B, R]: each response's score on its last real token (zeros elsewhere)."""
    rewards = torch.zeros_like(response_mask)
    lengths = response_mask.sum(-1).long()
    for i, (score, length) in enumerate(zip(scores, lengths.tolist())):
        rewards[i, max(length - 1, 0)] = float(score)
    return rewards
