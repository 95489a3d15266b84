"""Turn prompts and sampled responses into the padded tensors the actor workers consume.

Layout (as verl): input_ids [B, P+R] = prompt left-padded to P | response right-padded to R.
position_ids count real tokens only, so a left-padded prompt starts at position 0 like an unpadded one.
A multi-turn response (stages/train/agent_loops.py) holds tool tokens too: its own mask puts 0 on them, so every
loss, KL, entropy, advantage and metric, which all weigh tokens by response_mask, leaves them out.
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
    # multi-turn rows only (all empty on the single-turn path): 1 on model tokens, 0 on tool tokens
    response_masks: list[list[int]] = field(default_factory=list)
    turn_rewards: list[list[tuple[int, float]]] = field(default_factory=list)  # (position, tool step reward)
    agent_stats: list[dict] = field(default_factory=list)  # num_turns, tool_calls, tool_errors

    def __len__(self) -> int:
        return len(self.response_ids)

    def select(self, rows: list[int]) -> "Rollout":
        pick = lambda xs: [xs[i] for i in rows] if xs else []  # noqa: E731
        return Rollout(*(pick(getattr(self, name)) for name in ROLLOUT_FIELDS))

    def extend(self, other: "Rollout") -> None:
        for name in ROLLOUT_FIELDS:
            getattr(self, name).extend(getattr(other, name))

    def model_token_ids(self) -> list[list[int]]:
        """Each response's tokens that the model sampled (tool tokens left out): what the reward scores."""
        if not self.response_masks:
            return self.response_ids
        return [[t for t, m in zip(ids, mask) if m] for ids, mask in zip(self.response_ids, self.response_masks)]


ROLLOUT_FIELDS = ("prompt_ids", "response_ids", "index", "items", "finish_reasons", "scores", "accs", "log_probs",
                  "response_masks", "turn_rewards", "agent_stats")


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


def flatten_agent_outputs(items: list[dict], outputs: list[list]) -> Rollout:
    """Dataset items + their agent loops' outputs (AgentLoopOutput) -> one row per sample, masks kept."""
    r = Rollout([], [], [], [])
    for item, outs in zip(items, outputs):
        for out in outs:
            r.prompt_ids.append(list(out.prompt_ids))
            r.response_ids.append(list(out.response_ids))
            r.index.append(str(item["uid"]))
            r.items.append(item)
            r.finish_reasons.append(out.finish_reason)
            r.log_probs.append(list(out.response_logprobs))
            r.response_masks.append(list(out.response_mask))
            r.turn_rewards.append(list(out.turn_rewards))
            r.agent_stats.append({"num_turns": out.num_turns, "tool_calls": out.tool_calls,
                                  "tool_errors": out.tool_errors, "tool_rewards": dict(out.tool_rewards)})
    return r


def build_tensors(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
                  response_masks: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Padded tensors: input_ids, attention_mask, position_ids [B, P+R]; responses, response_mask [B, R].

    `response_masks` (multi-turn): each response's own mask (0 on tool tokens); None: 1 on every response token.
    """
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
            own = torch.tensor(response_masks[i], dtype=torch.float32) if response_masks else 1.0
            response_mask[i, : len(resp)] = own
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


def outcome_rewards(scores: list[float], response_mask: torch.Tensor,
                    turn_rewards: list[list[tuple[int, float]]] | None = None) -> torch.Tensor:
    """Token-level rewards [B, R]: each response's score on its last model token (zeros elsewhere), plus the
    tools' per-turn rewards on each turn's last model token (multi-turn)."""
    rewards = torch.zeros_like(response_mask)
    columns = torch.arange(response_mask.shape[1]).expand_as(response_mask)
    # the last position with mask 1 (not mask.sum() - 1: a multi-turn mask has zeros inside)
    last = torch.where(response_mask > 0, columns, torch.zeros_like(columns)).max(-1).values
    for i, (score, position) in enumerate(zip(scores, last.tolist())):
        rewards[i, position] = float(score)
    for i, row in enumerate(turn_rewards or []):
        for position, reward in row:
            rewards[i, position] += float(reward)
    return rewards
