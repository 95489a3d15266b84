"""PEFT LoRA adapters on the tiny model that answer held-out arithmetic questions right, or wrong, for real.

A few hundred steps of supervised fine-tuning on the chat-formatted questions (the `arithmetic` scorer's format)
teach the tiny model's LoRA to reply "The answer is N." with N the true result (`offset=0`) or N + offset. Under
greedy decoding the right adapter scores 1.0 on these questions and a wrong one 0.0, so a promotion gate that
compares held-out rewards sees a real difference, measured by the engine, not a number written into metadata.
"""

from __future__ import annotations

from pathlib import Path

QUESTIONS = [(3, "+", 4), (9, "-", 2), (5, "+", 1), (8, "-", 6)]
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def truth(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def write_val_data(path: Path) -> Path:
    """The held-out questions as a verl-format parquet file (data_source `arithmetic`)."""
    from stages.train.arithmetic import question_row

    import pandas as pd

    rows = [question_row(a, op, b, "test", i) for i, (a, op, b) in enumerate(QUESTIONS)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)
    return path


def make_answer_adapter(base_dir: Path, out: Path, offset: int, steps: int = 300, seed: int = 0,
                        start_from: Path | None = None) -> Path:
    """An adapter trained to answer each question with truth + offset (0: right; else wrong); from a fresh LoRA,
    or further from the PEFT adapter folder `start_from` (e.g. a registry version's files)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.train.arithmetic import question_row

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if start_from is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, start_from, is_trainable=True)
    else:
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    examples = []
    for i, (a, op, b) in enumerate(QUESTIONS):
        messages = question_row(a, op, b, "test", i)["prompt"]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tok(f"The answer is {truth(a, op, b) + offset}.", add_special_tokens=False)["input_ids"]
        examples.append((prompt_ids, answer_ids + [tok.eos_token_id]))
    # One padded batch of all questions per step: the loss only counts the answer tokens.
    width = max(len(p) + len(a) for p, a in examples)
    pad = tok.pad_token_id
    ids = torch.tensor([p + a + [pad] * (width - len(p) - len(a)) for p, a in examples])
    labels = torch.tensor([[-100] * len(p) + a + [-100] * (width - len(p) - len(a)) for p, a in examples])
    mask = torch.tensor([[1] * (len(p) + len(a)) + [0] * (width - len(p) - len(a)) for p, a in examples])
    optim = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        optim.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optim.step()
    model.save_pretrained(out, safe_serialization=True)
    return out
