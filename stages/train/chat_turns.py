"""The model's chat template, turn by turn: prompt ids with tool schemas, a tool turn's ids, and the check that
the ids a multi-turn loop built are what the template renders for the final messages.

Generation is token-in/token-out (verl's rule): the loop never re-tokenizes what the model wrote. It appends,
after the model's end-of-turn token, the template's turn separator (ChatML's newline after `<|im_end|>`: the
separator verl users report dropped at tool boundaries) and the template's rendering of the tool messages
followed by the next assistant header. Both are measured once per tokenizer by rendering a probe conversation.
"""

from __future__ import annotations

import re

from ground.errors import ConfigError

SANITY_KEY = "actor_rollout_ref.rollout.multi_turn.tokenization_sanity_check_mode"
_PROBE = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


class ChatTurns:
    """Token ids of a conversation's parts in `tokenizer`'s chat template, with `tools` (OpenAI schemas) shown."""

    def __init__(self, tokenizer, tools: list[dict] | None):
        self.tokenizer, self.tools = tokenizer, tools or None
        self.eos_id = tokenizer.eos_token_id
        head = self.render(_PROBE)
        eos = tokenizer.eos_token or ""
        # what the template writes after the assistant's end-of-turn token, before the next message
        self.separator = head[head.rfind(eos) + len(eos):] if eos and eos in head else ""
        self.separator_ids = self.encode(self.separator)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=self.tools, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.encode(self.render(messages, add_generation_prompt=True))

    def tool_turn_ids(self, tool_messages: list[dict]) -> list[int]:
        """Ids to append after the model's end-of-turn token: separator, tool messages, next assistant header."""
        head = self.render(_PROBE)
        full = self.render(_PROBE + tool_messages, add_generation_prompt=True)
        if not full.startswith(head):
            raise ConfigError(
                "The model's chat template renders an earlier turn differently once tool messages follow it, so "
                "tool turns cannot be appended token-in/token-out. Use a model whose template renders turns "
                "independently (ChatML: Qwen2.5, SmolLM2/3), or fix the template's tool branch."
            )
        return self.separator_ids + self.encode(full[len(head):])

    def check(self, messages: list[dict], ids: list[int], mode: str) -> None:
        """Compare the loop's `ids` with the template's rendering of the final `messages` (verl's sanity check).

        Text is compared, not ids: a model may sample a non-canonical tokenization of its own text, which is not
        an error. strict: any difference fails, naming the first differing token position; ignore_strippable:
        differences in whitespace pass; disable: nothing is checked. The rendering may go on past the loop's
        ids with only the end-of-turn token and whitespace (the loop stops right after the model's last token).
        """
        if mode == "disable":
            return
        # a sample the length budget stopped before its first turn ends with the assistant header
        expected = self.render(messages, add_generation_prompt=messages[-1]["role"] != "assistant")
        actual = _decode(self.tokenizer, ids)
        tail = expected[len(actual):] if expected.startswith(actual) else None
        if tail is not None and not tail.replace(self.tokenizer.eos_token or "\0", "", 1).strip():
            return
        if mode == "ignore_strippable":
            squash = lambda text: re.sub(r"\s+", "", text)  # noqa: E731
            a, e = squash(actual), squash(expected)
            if e.startswith(a) and e[len(a):] in ("", squash(self.tokenizer.eos_token or "")):
                return
        at = next((i for i, (a, b) in enumerate(zip(actual, expected)) if a != b), min(len(actual), len(expected)))
        # the token holding character `at`: the first prefix of ids whose text reaches past it, less one
        position = next((k - 1 for k in range(1, len(ids) + 1) if len(_decode(self.tokenizer, ids[:k])) > at), len(ids))
        at = len(_decode(self.tokenizer, ids[:position]))  # show both texts from that token's start
        raise ConfigError(
            f"Tokenization sanity check ({SANITY_KEY}={mode}): the ids the rollout trained on differ from the chat "
            f"template's rendering of the final messages at token position {position} (character {at}): the loop "
            f"has {actual[at:at + 40]!r}, the template {expected[at:at + 40]!r}. Training on them would not match "
            f"what the template makes at inference. Fix the template's tool turns, or set {SANITY_KEY}="
            "ignore_strippable (whitespace-only differences) or disable."
        )
