"""A tiny Llama model with a tokenizer trained here, so no test needs the network.

head_dim is 32 because vLLM's CPU attention rejects 16. The tokenizer is a byte-level BPE trained on a few
hundred lines of arithmetic and chat text; the chat template is ChatML, like SmolLM2's.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def _corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "what is the answer sum of plus minus times please compute result equals user assistant system".split()
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice(["+", "-", "*"])
        lines.append(f"What is {a} {op} {b}? The answer is {eval(f'{a}{op}{b}')}. " + " ".join(rng.choices(words, k=6)))
    return lines


def build_tokenizer(out: Path, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_tiny_model(out: str | Path, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Path:
    """Write a tiny Llama model folder (safetensors, float32) with its tokenizer to `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=hidden_size // 32, num_key_value_heads=1, head_dim=32,
        max_position_embeddings=1024, tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.config.dtype = torch.float32
    model.save_pretrained(out, safe_serialization=True)
    # generation_config with sampling off keeps vLLM and transformers defaults aligned
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.eos_token_id, "do_sample": False}))
    return out


def build_random_llama(out: str | Path, *, hidden_size: int, layers: int, intermediate_size: int,
                       vocab_size: int = 32000, seed: int = 0, shard_bytes: int = 256 << 20) -> dict:
    """A Llama model folder with random bf16 weights (N(0, 0.02)), written tensor by tensor in safetensors shards of
    at most `shard_bytes` with the Hugging Face index, so neither building nor loading it needs a whole copy.

    For memory tests: no tokenizer (the workers take token ids). Returns {"params": int, "bytes": int}.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=layers, num_attention_heads=hidden_size // 64, head_dim=64,
                         num_key_value_heads=hidden_size // 64, max_position_embeddings=1024,
                         tie_word_embeddings=False, dtype="bfloat16")
    config.save_pretrained(out)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    weight_map, shard, shard_size, files, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, shard_size, files
        if shard:
            name = f"model-{files:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, shard_size, files = {}, 0, files + 1

    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = torch.randn(shape, generator=gen, dtype=torch.bfloat16).mul_(0.02)
        if shard_size + tensor.nbytes > shard_bytes:
            flush()
        shard[key] = tensor
        shard_size += tensor.nbytes
        total += tensor.nbytes
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    return {"params": sum(math.prod(s) for s in shapes.values()), "bytes": total}
