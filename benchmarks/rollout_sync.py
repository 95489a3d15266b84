"""Rollout throughput and weight-sync cost of the vLLM rollout engine, per sync mode (not a test).

Measures, on one model (default: the packaged SmolLM2-135M, bf16) with a rank-16 all-linear LoRA whose B is
random (so the adapter is not a no-op):
- rollout tokens/s of the base model alone (merged-mode engine before any sync: no LoRA kernels),
- rollout tokens/s in adapter mode (LoRA enabled, adapter loaded) and in merged mode (after a merged sync),
- bytes per sync and seconds per sync (write + in-place reload) in each mode.

Engines run one after another, never together. Prints a Markdown table and writes JSON.

    .venv/bin/python benchmarks/rollout_sync.py --repeats 3 --out benchmarks/results/rollout_sync.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ground.new_files import refuse_existing_out, write_new_text  # noqa: E402

log = logging.getLogger("rollout_sync")


def build_prompts(tokenizer, count: int) -> list[list[int]]:
    prompts = []
    for i in range(count):
        a, b = (7 * i + 3) % 10, (3 * i + 5) % 10
        messages = [{"role": "user", "content": f"What is {a} + {b}? Explain step by step."}]
        prompts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False))
    return [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]


def make_lora_model(model_dir: str, rank: int, alpha: float, seed: int, scale: float):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * scale).to(p.dtype))
    return model.eval()


def lora_tensors(model) -> dict:
    return {n: p.detach() for n, p in model.named_parameters() if ".lora_" in n}


def write_merged(model, out_dir: Path, base_dir: str) -> int:
    """Merge and write one decoder layer per shard (as the actor does after a layered gather)."""
    from stages.train.sync_format import MergedModelWriter, merged_layers_from_peft

    writer = MergedModelWriter(out_dir, base_dir)
    for tensors in merged_layers_from_peft(model):
        writer.add(tensors)
    return writer.finish()


def throughput(engine, prompts, max_tokens: int, repeats: int) -> list[float]:
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = engine.generate(prompts, n=1, max_tokens=max_tokens, temperature=1.0, top_p=1.0, top_k=-1)
        seconds = time.perf_counter() - t0
        tokens = sum(len(s["token_ids"]) for samples in out for s in samples)
        rates.append(tokens / seconds)
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: packaged SmolLM2-135M)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="generate calls per measurement")
    parser.add_argument("--syncs", type=int, default=3, help="syncs per mode")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    parser.add_argument("--modes", default="merged,adapter")
    parser.add_argument("--threads-bind", default=None,
                        help="VLLM_CPU_OMP_THREADS_BIND for the engines, e.g. 0-1 (vLLM's default `auto` binds one "
                             "core per worker and reserves one on small machines)")
    parser.add_argument("--out", default="benchmarks/results/rollout_sync.json")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists (default: refuse)")
    args = parser.parse_args()
    refuse_existing_out(parser, [args.out] if args.out else [], args.force)
    if args.threads_bind:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.threads_bind
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from transformers import AutoTokenizer

    from ground.default_model import default_model_dir
    from stages.train.rollout import RolloutEngine
    from stages.train.sync_format import remove_sync_root, sync_root, write_adapter

    model_dir = args.model or str(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = build_prompts(tokenizer, args.prompts)
    model = make_lora_model(model_dir, args.rank, args.alpha, seed=0, scale=0.002)
    base_bytes = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    cfg = dict(load_format="safetensors", gpu_memory_utilization=args.gpu_memory_utilization,
               tensor_model_parallel_size=1, dtype="bfloat16", enforce_eager=True, max_num_seqs=256)
    root = sync_root(f"bench-{os.getpid()}")
    results: dict = {"model": model_dir, "rank": args.rank, "prompts": args.prompts, "max_tokens": args.max_tokens,
                     "base_model_bytes": base_bytes, "load_avg_start": os.getloadavg(),
                     "threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")}
    try:
        for mode in args.modes.split(","):
            with RolloutEngine(model_dir, cfg, lora_rank=args.rank, max_model_len=512, seed=0,
                               sync_mode=mode) as engine:
                throughput(engine, prompts[:4], 8, 1)  # warm-up
                entry: dict = {"engine_start_s": engine.start_seconds}
                if mode == "merged":
                    entry["base_tokens_per_s"] = throughput(engine, prompts, args.max_tokens, args.repeats)
                writes, reloads, sizes = [], [], []
                for i in range(args.syncs):
                    target = root / mode
                    t0 = time.perf_counter()
                    if mode == "adapter":
                        nbytes = write_adapter(target, lora_tensors(model), model.peft_config["default"].to_dict())
                    else:
                        nbytes = write_merged(model, target, model_dir)
                    writes.append(time.perf_counter() - t0)
                    update = engine.update_adapter if mode == "adapter" else engine.update_merged
                    reloads.append(update(str(target))["seconds"])
                    sizes.append(nbytes)
                entry.update(sync_bytes=sizes[-1], write_s=writes, reload_s=reloads,
                             tokens_per_s=throughput(engine, prompts, args.max_tokens, args.repeats))
                results[mode] = entry
                log.info("%s: %s", mode, entry)
    finally:
        remove_sync_root(root)
    results["load_avg_end"] = os.getloadavg()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_new_text(args.out, json.dumps(results, indent=2), replace=args.force)
    print_table(results)
    return 0


def print_table(r: dict) -> None:
    med = statistics.median
    base = med(r["merged"]["base_tokens_per_s"]) if "merged" in r else None
    print(f"\nmodel {r['model']}, rank {r['rank']} all-linear, {r['prompts']} prompts x {r['max_tokens']} tokens, "
          f"VLLM_CPU_OMP_THREADS_BIND={r['threads_bind']}, load avg {r['load_avg_start'][0]:.1f} -> "
          f"{r['load_avg_end'][0]:.1f}\n")
    print("| mode | rollout tokens/s (median) | vs base | bytes per sync | write s | reload s | sync s |")
    print("|---|---|---|---|---|---|---|")
    if base:
        print(f"| base alone | {base:.0f} | 1.00 | - | - | - | - |")
    for mode in ("adapter", "merged"):
        if mode not in r:
            continue
        e = r[mode]
        tps = med(e["tokens_per_s"])
        ratio = f"{tps / base:.2f}" if base else "-"
        w, rl = med(e["write_s"]), med(e["reload_s"])
        print(f"| {mode} | {tps:.0f} | {ratio} | {e['sync_bytes'] / 1e6:.1f} MB | {w:.2f} | {rl:.2f} | {w + rl:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
