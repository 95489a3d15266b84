"""Real PEFT LoRA adapters for the serving tests, made to answer differently from the base under greedy decoding.

PEFT initialises lora_B to zero (an adapter that changes nothing); these overwrite every LoRA matrix with
seeded noise large enough to move the tiny model's argmax. The base model is loaded once for all of them, and
the greedy answer transformers + PEFT give for each adapter is what the server must reproduce.
"""

from __future__ import annotations

from pathlib import Path

PROMPT = "What is 3 + 4?"
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(base_dir: Path, out_root: Path, seeds: list[int], rank: int = 8, scale: float = 0.5,
                  max_new_tokens: int = 8) -> tuple[dict[int, Path], dict[int | None, list[int]]]:
    """Write one PEFT adapter folder per seed; returns ({seed: dir}, {seed or None (base): greedy token ids})."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    ids = tok(PROMPT, return_tensors="pt").input_ids

    def greedy() -> list[int]:
        with torch.no_grad():
            out = peft_model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return out[0, ids.shape[1]:].tolist()

    dirs, answers = {}, {}
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * scale)
        dirs[seed] = out_root / f"adapter-{seed}"
        peft_model.save_pretrained(dirs[seed], safe_serialization=True)
        answers[seed] = greedy()
    with peft_model.disable_adapter():
        answers[None] = greedy()
    return dirs, answers
