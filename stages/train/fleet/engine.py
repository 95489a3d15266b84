"""One vLLM rollout engine for every member of a fleet: LoRA enabled, one slot per member.

Each member's adapter is synced as the single path's adapter sync does it (a PEFT folder reloaded in place,
`load_inplace`, under a LoRA id stable for the member's name), and each member's prompts go out in a call of
their own with that member's LoRARequest. On CPU a one-adapter batch runs on the project's merged-weight path
(ground/vllm_cpu_lora_merged.py), which keeps LORA_PIPELINE_CPU_LORA_MERGED_SLOTS merged copies per layer: the
recipe sets it to the number of members, so every member keeps its merge between steps (a member's merge is
rebuilt only after its own reload). `generate_members` sends several members' rows in one mixed multi-LoRA call
instead; fleet/rollout.py picks between the two by measuring both.
"""

from __future__ import annotations

import time

from ground.vllm_lora import stable_lora_id
from stages.train.rollout import RolloutEngine


class FleetEngine(RolloutEngine):
    """RolloutEngine in adapter mode with `max_loras` = the number of members; `use_member` picks whose
    adapter the next `generate` runs with."""

    def __init__(self, model_dir: str, rollout_cfg: dict, *, lora_rank: int, max_model_len: int, seed: int,
                 members: int):
        super().__init__(model_dir, rollout_cfg, lora_rank=lora_rank, max_model_len=max_model_len, seed=seed,
                         sync_mode="adapter", max_loras=max(1, members))
        self._requests: dict[str, object] = {}

    def update_member(self, name: str, adapter_dir: str) -> dict:
        """Load or reload in place member `name`'s PEFT adapter folder."""
        from vllm.lora.request import LoRARequest

        t0 = time.perf_counter()
        lora_id = stable_lora_id(f"fleet:{name}:{self.model_dir}")
        self._llm.llm_engine.add_lora(LoRARequest(name, lora_id, str(adapter_dir), load_inplace=True))
        self._requests[name] = LoRARequest(name, lora_id, str(adapter_dir))
        self._llm.reset_prefix_cache()  # prefix KV computed under the old weights of this id is stale
        return {"seconds": time.perf_counter() - t0}

    def generate_members(self, calls: list[dict]) -> list[list[list[dict]]]:
        """Several members' prompts in ONE vLLM call, each prompt with its member's LoRARequest and sampling.

        `calls`: [{"name", "prompts", "n", "max_tokens", "temperature", "top_p", "top_k"}, ...]; returns each
        call's `generate` result, in order. vLLM batches the rows of every member together (multi-LoRA)."""
        from stages.train.rollout import sampling_params

        prompts, params, requests, sizes = [], [], [], []
        for call in calls:
            sampling = sampling_params(n=call["n"], max_tokens=call["max_tokens"], temperature=call["temperature"],
                                       top_p=call["top_p"], top_k=call["top_k"], greedy=call.get("greedy", False))
            prompts += call["prompts"]
            params += [sampling] * len(call["prompts"])
            requests += [self._requests[call["name"]]] * len(call["prompts"])
            sizes.append(len(call["prompts"]))
        flat = self.generate_with(prompts, params, requests)
        out, start = [], 0
        for size in sizes:
            out.append(flat[start:start + size])
            start += size
        return out

    def generate_member(self, name: str, prompts: list[list[int]], **sampling) -> list[list[dict]]:
        """`generate` with member `name`'s adapter (synced first with update_member)."""
        self._lora_request = self._requests[name]
        try:
            return self.generate(prompts, **sampling)
        finally:
            self._lora_request = None
