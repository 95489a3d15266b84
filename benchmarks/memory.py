"""Each actor rank's peak memory during setup and during one update step (not a test).

For every combination of world size (`--world-sizes`, default 1 2) and loading mode (`--modes`: sharded = each
rank reads only its shard, rank0 = rank 0 reads every tensor and scatters the rows, whole = every rank loads the
whole base first), starts a fresh group of FSDP2 actor workers on Ray, and records per rank: peak resident host memory (Linux VmHWM) during setup, then - after resetting
the peak - during one PPO update step on a fixed batch; on CUDA also the peak allocated GPU memory. No vLLM engine.

The model is `--model-dir`, or (default) a random-weight bf16 Llama built here (`--hidden/--layers/--intermediate`;
the defaults give 468 M parameters, 0.94 GB). A tiny model run with the same settings gives the baseline (the
process's own imports, Ray, torch), so "growth" is what the model adds, as a share of the model's bytes.

    .venv/bin/python benchmarks/memory.py                                  # 1 and 2 CPU workers, all three modes
    .venv/bin/python benchmarks/memory.py --device cuda --world-sizes 1 2 --model-dir /path/to/model
    .venv/bin/python benchmarks/memory.py -o benchmarks/results/memory.md -- actor_rollout_ref.model.lora_rank=32
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 2**20


def _batch(rows: int, prompt_len: int, response_len: int, vocab: int):
    import torch

    from stages.train.batch import build_tensors

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(rows)]
    responses = [torch.randint(3, vocab, (response_len,), generator=g).tolist() for _ in range(rows)]
    batch = build_tensors(prompts, responses, pad_id=0)
    batch["advantages"] = torch.randn(rows, 1, generator=g).expand(rows, response_len).contiguous()
    batch["old_log_probs"] = torch.zeros(rows, response_len)
    return batch


def measure(model_dir: Path, world: int, mode: str, device: str, batch: dict, overrides: list[str]) -> list[dict]:
    """One fresh worker group: per-rank peaks after setup and after one update step."""
    from config import load_config
    from stages.train.worker_group import WorkerGroup

    cfg = load_config(None, [f"actor_rollout_ref.model.path={model_dir}", f"trainer.cpu_workers={world}",
                             f"trainer.n_gpus_per_node={world}", f"trainer.device={device}",
                             f"actor_rollout_ref.actor.fsdp_config.load_weights={mode}",
                             f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={batch['responses'].shape[0]}",
                             *overrides])
    t0 = time.perf_counter()
    group = WorkerGroup(cfg, str(model_dir), with_critic=False, total_steps=1, device=device)
    setup_s = time.perf_counter() - t0
    try:
        setup = group.call("memory_stats", reset_peaks=True)
        t0 = time.perf_counter()
        group.update_actor(batch, num_mini_batches=1, reuse_forward_as_old=True)
        step_s = time.perf_counter() - t0
        step = group.call("memory_stats")
    finally:
        group.shutdown()
    rows = []
    for s, u in zip(sorted(setup, key=lambda r: r["rank"]), sorted(step, key=lambda r: r["rank"])):
        rows.append({"world": world, "mode": mode, "rank": s["rank"], "setup_s": round(setup_s, 1),
                     "step_s": round(step_s, 1), "setup_peak_rss": s["peak_rss_bytes"],
                     "step_peak_rss": u["peak_rss_bytes"], "setup_cuda_peak": s.get("cuda_peak_bytes"),
                     "step_cuda_peak": u.get("cuda_peak_bytes")})
    return rows


def table(results: list[dict], baseline: dict, model: dict) -> str:
    lines = [f"Model: {model['params']:,} parameters, {model['bytes'] / MiB:.0f} MiB of weights. Growth = peak minus "
             "the tiny-model run's peak for the same world size, mode and rank, as a share of the model's bytes.",
             "",
             "| world | loading | rank | setup peak RSS MiB | growth | step peak RSS MiB | setup s | step s "
             "| CUDA setup / step peak MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        base = baseline[(r["world"], r["mode"], r["rank"])]
        growth = (r["setup_peak_rss"] - base) / model["bytes"]
        cuda = "-" if r["setup_cuda_peak"] is None else f"{r['setup_cuda_peak'] / MiB:.0f} / {r['step_cuda_peak'] / MiB:.0f}"
        lines.append(f"| {r['world']} | {r['mode']} | {r['rank']} | {r['setup_peak_rss'] / MiB:.0f} | {growth:.2f} "
                     f"| {r['step_peak_rss'] / MiB:.0f} | {r['setup_s']} | {r['step_s']} | {cuda} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="a model folder (default: build a random bf16 Llama)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--modes", nargs="+", default=["sharded", "rank0", "whole"],
                        choices=["sharded", "rank0", "whole"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rows", type=int, default=4, help="sequences per update step (one micro-batch)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--response-len", type=int, default=32)
    parser.add_argument("-o", "--out", type=Path, help="write the Markdown table here (and JSON beside it)")
    parser.add_argument("overrides", nargs="*", help="config overrides (after --)")
    args = parser.parse_args()

    import ray

    from stages.train.sharded_load import describe
    from tests.tiny_model import build_random_llama, build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="memory-bench-"))
    model_dir = args.model_dir
    if model_dir is None:
        model_dir = work / "random-llama"
        build_random_llama(model_dir, hidden_size=args.hidden, layers=args.layers,
                           intermediate_size=args.intermediate)
    tiny_dir = build_tiny_model(work / "tiny")
    model = describe(str(model_dir))
    vocab = min(model["config"]["vocab_size"], 384)  # token ids valid for both models
    batch = _batch(args.rows, args.prompt_len, args.response_len, vocab)
    overrides = ["actor_rollout_ref.model.dtype=bfloat16", *args.overrides]
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=max(4, max(args.world_sizes)))
    results, baseline = [], {}
    try:
        for world in args.world_sizes:
            for mode in args.modes:
                for r in measure(tiny_dir, world, mode, args.device, batch, overrides):
                    baseline[(world, mode, r["rank"])] = r["setup_peak_rss"]
                results += measure(model_dir, world, mode, args.device, batch, overrides)
                print(table(results[-world:], baseline, model).splitlines()[-1], flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)  # the random model is ~1 GB
    text = table(results, baseline, model)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"model": {k: model[k] for k in ("params", "bytes")},
                                                             "baseline": {f"{k[0]}/{k[1]}/{k[2]}": v
                                                                          for k, v in baseline.items()},
                                                             "results": results}, indent=2))


if __name__ == "__main__":
    main()
