"""vLLM's LoRA limits and adapter ids, shared by the rollout engine and the server."""

from __future__ import annotations

import hashlib

# vLLM 0.32 accepts exactly these values for max_lora_rank (`vllm.config.lora.MaxLoRARanks`).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def max_lora_rank_for(rank: int) -> int | None:
    """The smallest `max_lora_rank` vLLM accepts that holds an adapter of this rank (2 -> 8, 16 -> 16, 17 -> 32);
    None when the rank is above vLLM's largest. Ranks below 1 count as 1.

    vLLM sizes its LoRA buffers to max_lora_rank and its CPU kernels slow down as it grows, so round up to the
    nearest allowed value, not to the largest.
    """
    rank = max(int(rank or 0), 1)
    return next((allowed for allowed in VLLM_LORA_RANKS if rank <= allowed), None)


def stable_lora_id(name: str) -> int:
    """A positive id (56 bits) from sha256 of the adapter's name: the same in every process and run (Python's
    hash() is salted per process, so two processes would disagree about which adapter an id means)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "big") or 1
