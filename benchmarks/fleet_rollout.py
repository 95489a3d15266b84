"""A fleet's rollout on one engine: one generate call per member (merged weights) against one mixed call
(multi-LoRA: every member's rows in one batch). Not a test.

The engine is the fleet's (stages/train/fleet/engine.py): LoRA enabled, a slot per member, each member's adapter
a rank-r all-linear LoRA with random B (not a no-op), LORA_PIPELINE_CPU_LORA_MERGED_SLOTS = members as the fleet
run sets it. Each round generates every member's batch (prompts x n, max_tokens) both ways, alternating which
goes first; prints the median seconds per round of each and writes JSON. Before each round every member's adapter
is reloaded in place, as each training step's sync does (so one call per member pays its merges again);
--no-reload keeps them loaded (serving-like).

    .venv/bin/python benchmarks/fleet_rollout.py --members 3 --prompts 4 --n 4 --max-tokens 16 \
        --out benchmarks/results/fleet_rollout.json
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
from benchmarks.rollout_sync import build_prompts, lora_tensors, make_lora_model  # noqa: E402
from ground.new_files import refuse_existing_out, write_new_text  # noqa: E402

log = logging.getLogger("fleet_rollout")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="base model folder (default: the packaged SmolLM2-135M)")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per member per round")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt (rollout.n)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="float32", help="the engine's dtype (the example fleet trains float32)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-reload", action="store_true",
                        help="keep the adapters loaded between rounds (default: reload every member's adapter in place "
                             "before each round, as every training step does, so the merged path re-merges)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--force", action="store_true", help="replace --out")
    args = parser.parse_args()
    if args.out:
        refuse_existing_out(parser, [args.out], args.force)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["LORA_PIPELINE_CPU_LORA_MERGED_SLOTS"] = str(args.members)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from transformers import AutoTokenizer

    from ground.default_model import default_model_dir
    from stages.train.fleet.engine import FleetEngine
    from stages.train.sync_format import remove_sync_root, sync_root, write_adapter

    model_dir = args.model or str(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = build_prompts(tokenizer, args.prompts * args.members)
    names = [f"member{i}" for i in range(args.members)]
    root = sync_root(f"fleet-rollout-{os.getpid()}")
    cfg = dict(load_format="safetensors", gpu_memory_utilization=0.2, tensor_model_parallel_size=1,
               dtype=args.dtype, enforce_eager=True, max_num_seqs=256)
    calls = [{"name": name, "prompts": prompts[i * args.prompts:(i + 1) * args.prompts], "n": args.n,
              "max_tokens": args.max_tokens, "temperature": 1.0, "top_p": 1.0, "top_k": -1}
             for i, name in enumerate(names)]
    per_member, mixed = [], []
    try:
        engine = FleetEngine(model_dir, cfg, lora_rank=args.rank, max_model_len=512, seed=0, members=args.members)
        for i, name in enumerate(names):
            model = make_lora_model(model_dir, args.rank, 2 * args.rank, seed=i, scale=0.002)
            folder = root / name
            write_adapter(folder, lora_tensors(model), model.peft_config["default"].to_dict())
            engine.update_member(name, str(folder))
            del model

        def reload() -> None:  # what a training step's sync does: every member's adapter reloaded in place
            if not args.no_reload:
                for name in names:
                    engine.update_member(name, str(root / name))

        from ground import vllm_cpu_lora_merged as merged

        def one_call_each() -> float:
            reload()
            before = dict(merged.stats)
            t0 = time.perf_counter()
            for call in calls:
                engine.generate_member(call["name"], call["prompts"], n=call["n"], max_tokens=call["max_tokens"],
                                       temperature=1.0, top_p=1.0, top_k=-1)
            seconds = time.perf_counter() - t0
            log.info("per-member round %.2f s: merges built %d, merged forwards %d", seconds,
                     merged.stats["merges"] - before["merges"],
                     merged.stats["merged_forwards"] - before["merged_forwards"])
            return seconds

        def one_mixed_call() -> float:
            reload()
            t0 = time.perf_counter()
            engine.generate_members(calls)
            return time.perf_counter() - t0

        one_call_each(), one_mixed_call()  # warm-up: merges built, kernels compiled
        for r in range(args.rounds):
            order = (one_call_each, one_mixed_call) if r % 2 == 0 else (one_mixed_call, one_call_each)
            for fn in order:
                (per_member if fn is one_call_each else mixed).append(fn())
        engine.shutdown()
    finally:
        remove_sync_root(root)
    result = {"model": model_dir, "members": args.members, "prompts_per_member": args.prompts, "n": args.n,
              "max_tokens": args.max_tokens, "rank": args.rank, "dtype": args.dtype, "rounds": args.rounds,
              "reload_before_each_round": not args.no_reload,
              "per_member_s": per_member, "mixed_s": mixed,
              "per_member_median_s": statistics.median(per_member), "mixed_median_s": statistics.median(mixed),
              "mixed_over_per_member": statistics.median(mixed) / statistics.median(per_member),
              "load_avg_end": os.getloadavg()}
    print(f"{args.members} members x {args.prompts} prompts x n={args.n}, {args.max_tokens} tokens: one call per "
          f"member {result['per_member_median_s']:.2f} s, one mixed call {result['mixed_median_s']:.2f} s "
          f"({result['mixed_over_per_member']:.2f}x)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_new_text(args.out, json.dumps(result, indent=2), replace=args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
