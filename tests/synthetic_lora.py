"""Random LoRA adapter folders in PEFT's exact file format, written with numpy + safetensors (no torch).

A test fixture, kept out of the installed packages, for benchmarks and tests that need many adapters fast (a
publisher subprocess that imports torch spends seconds starting). The tensors follow PEFT's naming and shapes
(lora_A [r, in], lora_B [out, r]); the default module shapes are those of tests/tiny_model.py (hidden 64,
head_dim 32, 2 heads, 1 KV head, MLP 128).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

# module suffix -> (in_features, out_features) of the tiny Llama
TINY_LLAMA_SHAPES = {
    "self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32), "self_attn.v_proj": (64, 32),
    "self_attn.o_proj": (64, 64), "mlp.gate_proj": (64, 128), "mlp.up_proj": (64, 128), "mlp.down_proj": (128, 64),
}


def write_lora(out: str | Path, rank: int = 4, alpha: float = 8.0, layers: int = 2, seed: int = 0,
               targets: tuple[str, ...] = ("q_proj", "v_proj"), shapes: dict | None = None,
               base_model: str | None = None, config_overrides: dict | None = None,
               extra_tensors: dict | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors for a LoRA on `targets` of a Llama-like model."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = shapes or TINY_LLAMA_SHAPES
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers):
        for suffix, (fan_in, fan_out) in shapes.items():
            if suffix.rsplit(".", 1)[-1] not in targets:
                continue
            prefix = f"base_model.model.model.layers.{layer}.{suffix}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, fan_in), dtype=np.float32) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((fan_out, rank), dtype=np.float32) * 0.1
    tensors.update(extra_tensors or {})
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": sorted(targets),
        "bias": "none", "use_dora": False, "use_rslora": False, "modules_to_save": None,
        "fan_in_fan_out": False, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
    }
    config.update(config_overrides or {})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out
