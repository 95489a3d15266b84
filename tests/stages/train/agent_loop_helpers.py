"""A scripted stand-in for the rollout engine: replies with fixed texts per turn and records what it was given."""

from __future__ import annotations

CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "12*34"}}</tool_call>'


class ScriptedEngine:
    """Turn k of every sample answers `replies[k]` (text, then the end-of-turn token); `seen` keeps every prompt."""

    def __init__(self, tokenizer, replies: list[str]):
        self.tokenizer, self.replies = tokenizer, replies
        self.seen: list[list[int]] = []
        self.given: list[list[int]] = []  # what it answered, per call, in the same order

    def __call__(self, prompts: list[list[int]], budgets: list[int]) -> list[dict]:
        outs = []
        for prompt, budget in zip(prompts, budgets):
            turn = self.tokenizer.decode(prompt).count("<|im_start|>assistant") - 1
            ids = self.tokenizer(self.replies[min(turn, len(self.replies) - 1)], add_special_tokens=False)["input_ids"]
            ids = (ids + [self.tokenizer.eos_token_id])[:budget]
            self.seen.append(list(prompt))
            self.given.append(ids)
            outs.append({"token_ids": ids, "logprobs": [-0.5] * len(ids),
                         "finish_reason": "stop" if ids[-1] == self.tokenizer.eos_token_id else "length"})
        return outs
