"""A fleet step's rollout: every running member's batch through the one engine, then scored by its own reward.

Two ways to send the members to the engine (`fleet.rollout_batching`):
- `per_member`: one generate call per member, each with that member's adapter. On CPU a one-adapter batch runs
  on merged weights (ground/vllm_cpu_lora_merged.py), at the base model's speed per row.
- `mixed`: one call holding every member's rows, each with its own LoRARequest (vLLM's multi-LoRA batch). Fewer,
  larger batches, but every row pays the LoRA path.
Which is faster depends on the device and the shapes: on the 2-core CPU the two were within 10% of each other and
the order flipped with the shape and with whether the adapters had just been reloaded (benchmarks/fleet_rollout.py,
docs/training.md). `auto` (the default) therefore measures instead of guessing: the first step with two or more members goes per member, the next one mixed, and from then
on the run keeps the way that took fewer seconds per generated token (printed once, and in each step's metrics
as `timing/generate_mixed`). Both ways sample from the same adapters; only the batching differs.
"""

from __future__ import annotations

from ground.errors import ConfigError
from ground.logs import console_log

BATCHING = ("auto", "mixed", "per_member")


def check_batching(value: str, where: str) -> str:
    if value not in BATCHING:
        raise ConfigError(f"{where}: rollout_batching={value!r} is not one of {', '.join(BATCHING)}. `auto` measures "
                          "both ways on the first steps and keeps the faster one.")
    return value


class BatchingChoice:
    """Which way the next step's rollout goes, and (for `auto`) the seconds per generated token of each trial."""

    def __init__(self, mode: str):
        self.mode = mode
        self.trials: dict[str, float] = {}  # way -> seconds per generated token, one trial step each
        self.chosen: str | None = None if mode == "auto" else mode

    def next_way(self, live_members: int) -> str:
        if live_members < 2:  # one member: the same single-adapter call either way
            return "per_member"
        if self.chosen is not None:
            return self.chosen
        return next(way for way in ("per_member", "mixed") if way not in self.trials)

    def record(self, way: str, seconds: float, tokens: int, live_members: int) -> None:
        if self.chosen is not None or live_members < 2:
            return
        self.trials[way] = seconds / max(tokens, 1)
        if len(self.trials) == 2:
            self.chosen = min(self.trials, key=self.trials.get)
            console_log("fleet rollout: one call per member %.2f ms/token, one mixed call %.2f ms/token -> %s from "
                        "now on", 1e3 * self.trials["per_member"], 1e3 * self.trials["mixed"], self.chosen)

    def state_dict(self) -> dict:
        return {"trials": dict(self.trials), "chosen": self.chosen}

    def load_state_dict(self, state: dict) -> None:
        if self.mode == "auto" and state:  # a resumed run keeps the measured choice
            self.trials, self.chosen = dict(state.get("trials", {})), state.get("chosen")


def sampling_call(member, items: list[dict]) -> dict:
    """The engine call of one member's batch: its prompts, its adapter's name and its own sampling settings."""
    mcfg = member.spec.cfg
    rollout = mcfg.actor_rollout_ref.rollout
    return {"name": member.name, "prompts": [it["prompt_ids"] for it in items], "n": rollout.n,
            "max_tokens": rollout.response_length or mcfg.data.max_response_length,
            "temperature": rollout.temperature, "top_p": rollout.top_p, "top_k": rollout.top_k}


def generate(engine, calls: list[dict], way: str) -> list:
    """Each call's generations (a list per prompt of n samples), in the calls' order."""
    import ray

    if way == "mixed":
        return ray.get(engine.generate_members.remote(calls))
    sampling = [{k: v for k, v in call.items() if k not in ("name", "prompts")} for call in calls]
    # submitted together, run one after another by the engine actor: no round trip between members
    return ray.get([engine.generate_member.remote(call["name"], call["prompts"], **kw)
                    for call, kw in zip(calls, sampling)])


def score_rows(tokenizer, member, items: list[dict], outputs) -> dict:
    """One member's generations scored by its reward: prompt/response ids, scores, group ids, accuracies."""
    from stages.train.batch import flatten_generation

    r = flatten_generation(items, outputs)
    texts = tokenizer.batch_decode(r.response_ids, skip_special_tokens=True)
    results = member.reward_fn([it["data_source"] for it in r.items], texts,
                               [it["ground_truth"] for it in r.items], [it["extra_info"] for it in r.items])
    scores = [float(x["score"]) for x in results]
    accs = [x.get("acc") for x in results if x.get("acc") is not None]
    return {"prompts": r.prompt_ids, "responses": r.response_ids, "scores": scores, "index": r.index,
            "accs": accs}
