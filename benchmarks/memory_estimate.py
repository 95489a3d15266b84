"""Bytes per GPU (and host memory per node) of a training config, computed from the model's config numbers.

    .venv/bin/python benchmarks/memory_estimate.py                      # the 3B and 72B examples, 80 GB GPUs
    .venv/bin/python benchmarks/memory_estimate.py -c my.yaml --model-config /path/to/config.json --gpu-gib 141

The formula (N = GPUs in the FSDP group = nnodes x n_gpus_per_node; P = base parameters; A = LoRA parameters;
B = ppo_micro_batch_size_per_gpu; S = max_prompt_length + max_response_length; R = max_response_length;
H, I, V, L, kv = hidden, intermediate, vocab, layers, key/value width from config.json):

  base weights (bf16)      2P/N sharded, on the GPU, or in pinned host memory with param_offload; plus the
                           weights being all-gathered: the root unit (embeddings, lm_head, final norm: 2(V*H*e+H),
                           e = 1 tied or 2) for the whole forward/backward, and two decoder layers (the current one
                           and the prefetched next one: 2 x 2*P_layer)
  LoRA weights (fp32)      4A/N               grads (fp32) 4A/N          AdamW state (fp32 m, v) 8A/N
                           (all three in host memory with param_offload; AdamW state with optimizer_offload)
  activations              gradient checkpointing: each layer's input B*S*H*2 for L layers, plus one layer
                           recomputed at a time, about B*S*(2H + 2kv + 4I)*2; logits: the model's bf16 output
                           for the response positions only, B*(R+1)*V*2, then the response's fp32 logits and
                           log-softmax 2 x B*R*V*4, and the entropy's softmax B*R*V*4 only when entropy_coeff
                           puts the entropy in the loss (otherwise it is a metric computed without autograd)
                           (worst case: every sequence at the maximum lengths)
  vLLM                     gpu_memory_utilization x GPU memory (its weights at 2P/tensor_model_parallel_size, the
                           rest KV cache); this trainer keeps the engine resident during the update

LoRA on `all-linear` adapts every Linear inside the decoder layers (PEFT leaves lm_head out):
A = L * r * [(H+H) + 2(H+kv) + (H+H) + 3(H+I)] for Llama/Qwen2 layers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GB = 1e9

# Public config.json values (Hugging Face Qwen/Qwen2.5-3B-Instruct and Qwen/Qwen2.5-72B-Instruct).
KNOWN_MODELS = {
    "Qwen/Qwen2.5-3B-Instruct": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                                 "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
                                 "tie_word_embeddings": True, "attention_bias": True},
    "Qwen/Qwen2.5-72B-Instruct": {"hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
                                  "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064,
                                  "tie_word_embeddings": False, "attention_bias": True},
}
EXAMPLES = [ROOT / "examples" / "qwen2_5_3b_gsm8k_grpo_lora.yaml",
            ROOT / "examples" / "qwen2_5_72b_lora_layered_summon.yaml"]


def model_numbers(mc: dict) -> dict:
    """Parameter counts of a Llama/Qwen2-style decoder from its config.json values."""
    h, i, layers, v = mc["hidden_size"], mc["intermediate_size"], mc["num_hidden_layers"], mc["vocab_size"]
    kv = h // mc["num_attention_heads"] * mc["num_key_value_heads"]
    bias = h + 2 * kv if mc.get("attention_bias", False) else 0  # Qwen2: q, k, v projections have biases
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * i + bias + 2 * h  # q, k, v, o, gate/up/down, norms
    root = v * h * (1 if mc.get("tie_word_embeddings", False) else 2) + h
    return {"H": h, "I": i, "L": layers, "V": v, "kv": kv, "per_layer": per_layer, "root": root,
            "P": per_layer * layers + root}


def lora_params(n: dict, rank: int) -> int:
    h, i, kv = n["H"], n["I"], n["kv"]
    return n["L"] * rank * ((h + h) + 2 * (h + kv) + (h + h) + 3 * (h + i))


def estimate(cfg, mc: dict, gpu_bytes: float) -> dict:
    """Bytes per GPU by component, and host bytes per node, for config `cfg` on a model with config `mc`."""
    arr, t, data = cfg.actor_rollout_ref, cfg.trainer, cfg.data
    n = model_numbers(mc)
    gpus, per_node = t.nnodes * t.n_gpus_per_node, t.n_gpus_per_node
    a = lora_params(n, arr.model.lora_rank) if arr.model.target_modules == "all-linear" else None
    if a is None:
        raise SystemExit("this estimate knows target_modules=all-linear only")
    b, r = arr.actor.ppo_micro_batch_size_per_gpu, data.max_response_length
    s = data.max_prompt_length + r
    offload = arr.actor.fsdp_config.param_offload or arr.ref.fsdp_config.param_offload
    opt_offload = offload or arr.actor.fsdp_config.optimizer_offload
    shard = 2 * n["P"] / gpus
    in_flight = 2 * n["root"] + 2 * (2 * n["per_layer"])
    if arr.model.enable_gradient_checkpointing:
        layer_acts = n["L"] * b * s * n["H"] * 2 + b * s * (2 * n["H"] + 2 * n["kv"] + 4 * n["I"]) * 2
    else:  # every layer keeps its working set for backward
        layer_acts = n["L"] * b * s * (2 * n["H"] + 2 * n["kv"] + 4 * n["I"]) * 2
    fp32_copies = 3 if arr.actor.entropy_coeff else 2
    logits = b * (r + 1) * n["V"] * 2 + fp32_copies * b * r * n["V"] * 4
    rows = {
        "base weights, own shard": 0 if offload else shard,
        "base weights being gathered": in_flight,
        "LoRA weights (fp32)": 0 if offload else 4 * a / gpus,
        "LoRA grads (fp32)": 0 if offload else 4 * a / gpus,
        "AdamW state (fp32)": 0 if opt_offload else 8 * a / gpus,
        "activations (checkpoints + one layer)": layer_acts,
        "logits (bf16 output + fp32 response)": logits,
        "vLLM (gpu_memory_utilization)": arr.rollout.gpu_memory_utilization * gpu_bytes,
    }
    host_per_gpu = (shard if offload else 0) + (8 * a / gpus if offload else 0) + (8 * a / gpus if opt_offload else 0)
    shm = 2 * n["P"] if arr.model.use_shm else 0
    return {"n": n, "lora": a, "gpus": gpus, "per_node": per_node, "rows": rows, "gpu_total": sum(rows.values()),
            "host_per_gpu": host_per_gpu, "shm": shm, "B": b, "S": s, "R": r}


def markdown(results: list[tuple[str, dict]], gpu_bytes: float) -> str:
    head = "| per GPU (GB) | " + " | ".join(name for name, _ in results) + " |"
    lines = [head, "|---|" + "---|" * len(results)]
    for key in results[0][1]["rows"]:
        lines.append(f"| {key} | " + " | ".join(f"{e['rows'][key] / GB:.2f}" for _, e in results) + " |")
    lines.append("| **total per GPU** | " + " | ".join(f"**{e['gpu_total'] / GB:.1f}** of {gpu_bytes / GB:.0f}"
                                                     for _, e in results) + " |")
    lines.append("| total GPU per node | " + " | ".join(f"{e['gpu_total'] * e['per_node'] / GB:.0f}"
                                                     for _, e in results) + " |")
    lines.append("| host per node: offloaded state | " + " | ".join(
        f"{e['host_per_gpu'] * e['per_node'] / GB:.1f}" for _, e in results) + " |")
    lines.append("| host per node: /dev/shm model copy | " + " | ".join(f"{e['shm'] / GB:.1f}" for _, e in results)
                 + " |")
    return "\n".join(lines)


def describe(name: str, e: dict) -> str:
    n = e["n"]
    return (f"{name}: H={n['H']}, I={n['I']}, L={n['L']}, V={n['V']}, kv={n['kv']} -> P={n['P']:,} base parameters "
            f"({2 * n['P'] / GB:.1f} GB bf16), A={e['lora']:,} LoRA parameters; N={e['gpus']} GPUs, "
            f"B={e['B']}, S={e['S']}, R={e['R']}")


def main() -> None:
    from config import load_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", type=Path, action="append", help="training config(s); default: examples")
    parser.add_argument("--model-config", type=Path, help="config.json of the model (default: known public values)")
    parser.add_argument("--gpu-gib", type=float, default=80, help="memory of one GPU in GB (1e9 bytes)")
    args = parser.parse_args()
    gpu_bytes = args.gpu_gib * GB
    results, notes = [], []
    for path in args.config or EXAMPLES:
        cfg = load_config(path)
        name = cfg.actor_rollout_ref.model.path
        if args.model_config:
            mc = json.loads(args.model_config.read_text())
        elif name in KNOWN_MODELS:
            mc = KNOWN_MODELS[name]
        else:
            raise SystemExit(f"{name}: pass --model-config path/to/config.json")
        e = estimate(cfg, mc, gpu_bytes)
        results.append((Path(path).stem, e))
        notes.append(describe(Path(path).stem, e))
    print("\n".join(notes) + "\n")
    print(markdown(results, gpu_bytes))


if __name__ == "__main__":
    main()
