"""Real PEFT LoRA adapters for the serving tests, made to answer differently from the base under greedy decoding.

PEFT initialises lora_B to zero (an adapter that changes nothing); these overwrite every LoRA matrix with
seeded noise large enough to move the tiny model's argmax.
"""

from __future__ import annotations

from pathlib import Path

PROMPT = "What is 3 + 4?"
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(base_dir: Path, out: Path, seed: int, rank: int = 8, scale: float = 0.5) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def peft_greedy(base_dir: Path, adapter_dir: Path | None, prompt: str = PROMPT, max_new_tokens: int = 8) -> list[int]:
    """Greedy token ids from transformers (+ PEFT): what the server must reproduce for this adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()
