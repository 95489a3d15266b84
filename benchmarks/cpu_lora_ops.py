"""Rollout tokens/s with a LoRA adapter, the CPU LoRA plugin on and off, against the merged model (not a test).

Four vLLM engines run side by side, each with its engine core in its own process, and take turns call by call
(merged, on, segmented, off, merged, ...), so all of them share whatever load the machine has at the time:
- `merged`: no LoRA in the engine: the compute of merged mode (the base model's weights stand in for merged
  ones: same shapes and dtype, same work);
- `on`: a rank-16 all-linear adapter (random B) in adapter mode with the plugin as installed by default: a
  single-adapter batch runs on the slot's merged weights (ground/vllm_cpu_lora_merged.py);
- `segmented`: the same adapter with the merged fast path off (LORA_PIPELINE_CPU_LORA_MERGED_SLOTS=0): the fused
  add_lora_linear and the segmented ops (ground/vllm_cpu_lora.py), what mixed batches run;
- `off`: the same adapter with vLLM's own torch ops (LORA_PIPELINE_CPU_LORA_OPS=0 in that engine's process).
`off` takes minutes per call here, so it gets fewer calls (--off-calls), spread among the others.

Shapes: `demo` (the default config's step: train_batch_size prompts x n responses, <= max_response_length new
tokens, the demo's arithmetic prompts) and `prefill` (32 prompts of 256 tokens, 32 new tokens). Every call
takes a fresh prompt set, so vLLM's prefix cache never serves a prompt an earlier call already computed.
Engine threads: VLLM_CPU_OMP_THREADS_BIND=all cores (the trainer's in-process engine uses every core too).

    .venv/bin/python benchmarks/cpu_lora_ops.py --calls 3 --off-calls 1 -o benchmarks/results/cpu_lora_ops.merged.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# each engine core in its own process (generate_floor, imported below, would default this to 0): the switch is
# read per process, so only separate processes can run the segmented and vLLM's own ops side by side
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ground.new_files import refuse_existing_out, write_new_text  # noqa: E402

PREFILL_PROMPTS, PREFILL_LENGTH, PREFILL_NEW = 32, 256, 32
VARIANTS = ("merged", "on", "segmented", "off")


def shapes(cfg, model_dir: str, sets: int) -> dict:
    from generate_floor import demo_prompts

    data, rollout = cfg.data, cfg.actor_rollout_ref.rollout
    batch = data.train_batch_size
    pool = demo_prompts(cfg, model_dir, batch * sets)
    demo = dict(sets=[pool[i * batch:(i + 1) * batch] for i in range(sets)], n=rollout.n,
                max_tokens=data.max_response_length)
    prefill = dict(sets=[[[(31 * (k * PREFILL_PROMPTS + i) + 7 * j) % 9000 + 200 for j in range(PREFILL_LENGTH)]
                          for i in range(PREFILL_PROMPTS)] for k in range(sets)], n=1, max_tokens=PREFILL_NEW)
    return {"demo": demo, "prefill": prefill}


def start_engine(model_dir: str, variant: str, rank: int):
    from vllm import LLM

    import ground.vllm_cpu_lora as segmented
    import ground.vllm_cpu_lora_merged as merged_path

    # The engine core process starts now. Spawned, it loads the plugin and reads the switches from its environment;
    # forked (vLLM's default here), it inherits this process's op names and methods as they are at this moment.
    os.environ[segmented.ENV_SWITCH] = "0" if variant == "off" else "1"
    os.environ[merged_path.SLOTS_ENV] = "0" if variant == "segmented" else "1"
    segmented.uninstall()
    if variant != "off":
        segmented.install()
        merged_path.install()
    kwargs = dict(model=model_dir, load_format="safetensors", dtype="auto", enforce_eager=True, seed=0,
                  max_model_len=512, max_num_seqs=256,
                  kv_cache_memory_bytes=1 << 29)  # 512 MiB each: the prefill shape needs ~220 MB of it
    if variant != "merged":
        kwargs.update(enable_lora=True, max_lora_rank=rank, max_loras=1, max_cpu_loras=1)
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    return llm, time.perf_counter() - t0


def one_call(llm, lora_request, shape: dict, prompts: list[list[int]]) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(n=shape["n"], max_tokens=shape["max_tokens"], temperature=1.0, top_p=1.0,
                            detokenize=False)
    t0 = time.perf_counter()
    out = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, lora_request=lora_request,
                       use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for o in out for c in o.outputs)
    prompt_tokens = sum(len(p) for p in prompts) * shape["n"]
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "all_tokens_per_s": (tokens + prompt_tokens) / seconds, "load_1min": os.getloadavg()[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3, help="measured calls per shape for `merged` and `on`")
    ap.add_argument("--off-calls", type=int, default=1, help="measured calls per shape for `off` (minutes each)")
    ap.add_argument("--shapes", default="demo,prefill")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="which engines to start (`off` alone costs minutes per call)")
    ap.add_argument("-o", "--out", help="write the results as JSON here")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists (default: refuse)")
    args = ap.parse_args()
    refuse_existing_out(ap, [args.out] if args.out else [], args.force)
    if args.calls < 1 or args.off_calls < 0:
        ap.error(f"--calls {args.calls} / --off-calls {args.off_calls}: pass at least 1 / 0")
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    if "merged" not in variants or not set(args.variants.split(",")) <= set(VARIANTS):
        ap.error(f"--variants {args.variants}: pick from {','.join(VARIANTS)}, merged included (the reference)")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{len(os.sched_getaffinity(0)) - 1}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

    from rollout_sync import lora_tensors, make_lora_model
    from vllm.lora.request import LoRARequest

    from config import load_config
    from ground.base_model import resolve_model_path
    from stages.train.sync_format import remove_sync_root, sync_root, write_adapter

    cfg = load_config(None, [])
    model_dir = str(resolve_model_path(cfg.actor_rollout_ref.model.path))
    all_shapes = shapes(cfg, model_dir, sets=args.calls + 2)
    shape_set = {name: all_shapes[name] for name in args.shapes.split(",")}
    root = sync_root(f"cpu-lora-bench-{os.getpid()}")
    results: dict = {"model": model_dir, "rank": 16, "targets": "all-linear", "calls": args.calls,
                     "off_calls": args.off_calls, "cpus": len(os.sched_getaffinity(0)),
                     "threads_bind": os.environ["VLLM_CPU_OMP_THREADS_BIND"], "load_avg_start": os.getloadavg(),
                     "shapes": {name: {"prompts": len(s["sets"][0]), "n": s["n"], "max_tokens": s["max_tokens"],
                                       "prompt_tokens_mean": statistics.mean(len(p) for p in s["sets"][0])}
                                for name, s in shape_set.items()},
                     "calls_by_variant": {v: {name: [] for name in shape_set} for v in variants}}
    engines = {}
    try:
        model = make_lora_model(model_dir, rank=16, alpha=32, seed=0, scale=0.002)
        write_adapter(root / "adapter", lora_tensors(model), model.peft_config["default"].to_dict())
        del model
        lora = LoRARequest("bench-adapter", 1, str(root / "adapter"))
        results["engine_start_s"] = {}
        for variant in variants:
            engines[variant], results["engine_start_s"][variant] = start_engine(model_dir, variant, rank=16)
        for name, shape in shape_set.items():
            for variant in variants:  # warm-up (the adapter engines load the adapter here); `off` on 2 prompts
                # only: its warm-up at the full shape took minutes, and loading the adapter needs just one request
                warm_up = shape["sets"][-1][:2] if variant == "off" else shape["sets"][-1]
                one_call(engines[variant], None if variant == "merged" else lora, shape, warm_up)
            for i in range(args.calls):
                for variant in variants:
                    if variant == "off" and i >= args.off_calls:
                        continue
                    call = one_call(engines[variant], None if variant == "merged" else lora, shape, shape["sets"][i])
                    results["calls_by_variant"][variant][name].append(call)
                    print(f"  {name} {variant}: {call['tokens_per_s']:.1f} tokens/s, load {call['load_1min']:.1f}",
                          file=sys.stderr, flush=True)
    finally:
        for llm in engines.values():
            llm.llm_engine.engine_core.shutdown()
        remove_sync_root(root)
    results["load_avg_end"] = os.getloadavg()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_new_text(args.out, json.dumps(results, indent=2) + "\n", replace=args.force)
    print_table(results)
    return 0


def print_table(r: dict) -> None:
    med = statistics.median
    print(f"\n{r['model']}, LoRA rank 16 all-linear, {r['cpus']} CPUs, load avg {r['load_avg_start'][0]:.1f} -> "
          f"{r['load_avg_end'][0]:.1f}\n")
    print("| shape | merged tokens/s | adapter, plugin on | adapter, segmented only | adapter, vLLM's ops | "
          "on / merged | segmented / merged | vLLM's / merged | per-round ratios on / merged |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in r["shapes"]:
        calls = {v: [c["tokens_per_s"] for c in r["calls_by_variant"].get(v, {}).get(name, [])] for v in VARIANTS}
        merged = med(calls["merged"])
        on, seg, off = (med(calls[v]) if calls[v] else float("nan") for v in ("on", "segmented", "off"))
        rounds = ", ".join(f"{a / b:.2f}" for a, b in zip(calls["on"], calls["merged"]))
        print(f"| {name} | {merged:.0f} | {on:.0f} | {seg:.0f} | {off:.0f} | {on / merged:.2f} | {seg / merged:.2f} | "
              f"{off / merged:.2f} | {rounds} |")


if __name__ == "__main__":
    sys.exit(main())
