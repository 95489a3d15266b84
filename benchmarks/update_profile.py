"""Where the actor update's time goes at vs_trl.py's shape: seconds, matrix-product FLOPs and GFLOP/s (not a test).

One FSDP2 `ActorWorker` (the training stage's own class, world size 1 over gloo, no Ray) on the packaged
SmolLM2-135M-Instruct in float32 with the benchmark's LoRA (r16 all-linear), one prompt forward per group
(`share_prompt_forward=true`, as vs_trl.py sets it), and a GRPO batch of random tokens: 4 prompts of 44 tokens x
4 responses of 8-32 tokens. `update_actor` runs `--updates` times; the last one runs under torch.profiler with
FLOP counting, which reports the matrix products' FLOPs and their own time.

    .venv/bin/python benchmarks/update_profile.py --updates 3 -o benchmarks/results/update_profile.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ground.new_files import refuse_existing_out, write_new_text  # noqa: E402

PROMPTS, RESPONSES, PROMPT_LEN, MAX_NEW = 4, 4, 44, 32
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def grpo_batch(vocab: int, seed: int = 0) -> dict:
    """PROMPTS groups of RESPONSES rows sharing a prompt, in the trainer's layout, with random advantages."""
    import torch

    from stages.train.batch import build_tensors

    rng = random.Random(seed)
    rows = []
    for _ in range(PROMPTS):
        prompt = [rng.randrange(3, vocab) for _ in range(PROMPT_LEN)]
        rows += [(prompt, [rng.randrange(3, vocab) for _ in range(rng.randint(8, MAX_NEW))]) for _ in range(RESPONSES)]
    batch = build_tensors([p for p, _ in rows], [r for _, r in rows], pad_id=0)
    gen = torch.Generator().manual_seed(seed)
    batch["advantages"] = torch.randn(batch["response_mask"].shape, generator=gen) * batch["response_mask"]
    batch["old_log_probs"] = torch.zeros_like(batch["response_mask"])  # unused: the update reuses its forward
    return batch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=3, help="update_actor calls; the last one is profiled")
    ap.add_argument("-o", "--out", help="write the results as JSON here")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists (default: refuse)")
    args = ap.parse_args()
    if args.updates < 1:
        ap.error(f"--updates {args.updates}: pass 1 or more (the last update is the profiled one)")
    refuse_existing_out(ap, [args.out] if args.out else [], args.force)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from config import load_config
    from ground.base_model import resolve_model_path
    from stages.train.actor_worker import ActorWorker
    from ground.ports import free_port

    model_dir = str(resolve_model_path("smollm2-135m-instruct"))
    cfg = load_config(None, [f"actor_rollout_ref.model.path={model_dir}", "actor_rollout_ref.model.dtype=float32",
                             "actor_rollout_ref.model.lora_rank=16", "actor_rollout_ref.model.lora_alpha=32",
                             "actor_rollout_ref.model.share_prompt_forward=true", "trainer.device=cpu",
                             "trainer.logger=[console]"])
    threads = torch.get_num_threads()
    worker = ActorWorker(0, 1, cfg.to_dict(), model_dir, False, 100, "cpu", threads)
    worker.init_distributed("127.0.0.1", free_port())
    worker.setup()
    batch = grpo_batch(vocab=49152)
    seconds = []
    try:
        for i in range(args.updates):
            last = i == args.updates - 1
            with profile(activities=[ProfilerActivity.CPU], with_flops=True) if last else nullcontext() as prof:
                t0 = time.perf_counter()
                worker.update_actor(dict(batch), 1, True)
                seconds.append(time.perf_counter() - t0)
    finally:
        worker.shutdown()
    events = [e for e in prof.key_averages() if e.key in MATMULS]
    flops = sum(e.flops for e in events)
    mm_seconds = sum(e.self_cpu_time_total for e in events) / 1e6
    result = {"threads": threads, "rows": PROMPTS * RESPONSES, "tokens": int(batch["attention_mask"].sum()),
              "update_s": seconds, "profiled_update_s": seconds[-1], "matmul_gflop": flops / 1e9,
              "matmul_s": mm_seconds, "matmul_gflop_per_s": flops / 1e9 / mm_seconds}
    print(f"updates s: {[round(s, 2) for s in seconds]} (the last one profiled)")
    print(f"matrix products: {result['matmul_gflop']:.0f} GFLOP in {mm_seconds:.2f} s "
          f"({result['matmul_gflop_per_s']:.0f} GFLOP/s) of a {seconds[-1]:.2f} s update, {threads} threads")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_new_text(args.out, json.dumps(result, indent=2) + "\n", replace=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
