"""PEFT adapter folders: the file names PEFT and vLLM read, and the tensor keys PEFT writes.

An adapter folder holds `adapter_config.json` (PEFT's LoraConfig, lora_alpha included) and
`adapter_model.safetensors` (the LoRA tensors). `adapter_model.bin` is PEFT's older pickle format, which this
project never loads.
"""

from __future__ import annotations

import re

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"

# In memory PEFT names a LoRA tensor `...q_proj.lora_A.<adapter name>.weight`; on disk the adapter name is left out.
_ADAPTER_NAME_IN_KEY = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.[^.]+\.weight$")


def saved_key(name: str) -> str:
    """The key PEFT's `save_pretrained` writes for an in-memory parameter name.

    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight` ->
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`; names already in saved form pass through.
    """
    return _ADAPTER_NAME_IN_KEY.sub(lambda m: f".{m.group(1)}.weight", name)
