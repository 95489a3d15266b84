"""How long the vLLM rollout engine alone takes for one step's generation at vs_trl.py's shape (not a test).

A lower bound for the training step: the trainer's step is generate + update + sync, one after the other, so no
tuning of the update gets the step below what this script measures plus the sync. Shape as in vs_trl.py: the
demo's arithmetic prompts, 4 prompts x 4 responses, at most 32 new tokens, temperature 1, SmolLM2-135M-Instruct.

The engine is the project's own `RolloutEngine` (merged mode, as training on CPU uses it), with its core in this
process as the trainer runs it (VLLM_ENABLE_V1_MULTIPROCESSING=0). Variants, one engine after another:
`default` (the config's: stored dtype bf16, eager), `float32` (rollout.dtype=float32) and `compiled`
(rollout.enforce_eager=false: vLLM's torch.compile path). Per variant: engine start, seconds per generate call,
decode steps (the longest response), tokens, and the CPU cores the process used while generating.

    .venv/bin/python benchmarks/generate_floor.py --calls 6 -o benchmarks/results/generate_floor.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before vLLM is imported: the trainer's setting
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ground.new_files import refuse_existing_out, write_new_text  # noqa: E402

PROMPTS, RESPONSES, MAX_NEW = 4, 4, 32
VARIANTS = {"default": {}, "float32": {"dtype": "float32"}, "compiled": {"enforce_eager": False}}


def demo_prompts(cfg, model_dir: str, count: int) -> list[list[int]]:
    """The first `count` training prompts of the demo's arithmetic data, chat template applied."""
    from transformers import AutoTokenizer

    from stages.train.arithmetic import make_arithmetic
    from stages.train.data import PromptDataset

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        train_path, _ = make_arithmetic(tmp, seed=0)
        items = PromptDataset(str(train_path), tokenizer, cfg.data).items
    return [it["prompt_ids"] for it in items[:count]]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process, the engine core's included
    return usage.ru_utime + usage.ru_stime


def measure(cfg, model_dir: str, variant: str, prompts: list[list[int]], calls: int) -> dict:
    from stages.train.rollout import RolloutEngine

    rollout = {**cfg.actor_rollout_ref.rollout.model_dump(), **VARIANTS[variant]}
    entry: dict = {"variant": variant, "seconds": [], "cores": [], "decode_steps": [], "tokens": []}
    with RolloutEngine(model_dir, rollout, lora_rank=16, max_model_len=256, seed=0, sync_mode="merged") as engine:
        entry["engine_start_s"] = engine.start_seconds
        for _ in range(calls + 1):  # the first call warms up and is left out
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            out = engine.generate(prompts, n=RESPONSES, max_tokens=MAX_NEW, temperature=1.0, top_p=1.0, top_k=-1)
            seconds = time.perf_counter() - t0
            lengths = [len(s["token_ids"]) for samples in out for s in samples]
            entry["seconds"].append(seconds)
            entry["cores"].append((cpu_seconds() - cpu0) / seconds)
            entry["decode_steps"].append(max(lengths))
            entry["tokens"].append(sum(lengths))
    for key in ("seconds", "cores", "decode_steps", "tokens"):
        entry[key] = entry[key][1:]
    return entry


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=6, help="generate calls per variant after one warm-up call")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    ap.add_argument("-o", "--out", help="write the results as JSON here")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists (default: refuse)")
    args = ap.parse_args()
    refuse_existing_out(ap, [args.out] if args.out else [], args.force)
    if args.calls < 1:
        ap.error(f"--calls {args.calls}: pass 1 or more (each variant's medians need at least one measured call)")
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; valid: {list(VARIANTS)}")
    from config import load_config
    from ground.base_model import resolve_model_path

    cfg = load_config(None, [])  # the demo's config: its rollout settings are the `default` variant
    model_dir = str(resolve_model_path(cfg.actor_rollout_ref.model.path))  # verifies the packaged model once
    prompts = demo_prompts(cfg, model_dir, PROMPTS)
    results = [measure(cfg, model_dir, v, prompts, args.calls) for v in args.variants.split(",")]
    med = statistics.median
    print(f"\n{PROMPTS} prompts x {RESPONSES} responses, <= {MAX_NEW} new tokens, {os.cpu_count()} CPUs\n")
    print("| variant | engine start s | generate s (median) | decode steps (median) | tokens (median) | cores used |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['engine_start_s']:.1f} | {med(r['seconds']):.2f} | {med(r['decode_steps']):.0f} "
              f"| {med(r['tokens']):.0f} | {med(r['cores']):.2f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_new_text(args.out, json.dumps(results, indent=2) + "\n", replace=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
