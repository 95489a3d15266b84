"""`gpu_smoke.sh --members 1,4,16`: the fleet's update path (stages/train/fleet) with N members mixed in one batch.

For each N: the base plus N members' LoRA weights (rank 16, all-linear) under FSDP2 (world size 1, bf16 compute,
float32 LoRA weights), a batch of N x `--rows-per-member` rows (row i belongs to member i mod N, so every
micro-batch mixes all members), then `--steps` times: the old log-probs pass and one update (per-member
token-mean loss, backward, per-member clipping, one AdamW step over N parameter groups). Prints each N's median
step time, so a GPU run shows how the actor's step grows with the number of adapters at equal rows per member.
"""

from __future__ import annotations

import gc
import statistics
import time


def run_fleet_smoke(args, model_dir: str, device: str, vocab: int, random_batch, clock) -> int:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from config import load_config
    from ground.ports import free_port
    from stages.train.fleet.members import FleetMember
    from stages.train.fleet.model import build_fleet_model, log_probs, shard_fleet_model
    from stages.train.fleet.update import FleetOptimizer, update_step

    counts = [int(n) for n in str(args.members).split(",") if n.strip()]
    if not counts or min(counts) < 1:
        print(f"gpu_smoke: --members={args.members!r} must list member counts of at least 1, e.g. 1,4,16")
        return 2
    dtype = torch.bfloat16
    actor_cfg = load_config(None, []).actor_rollout_ref.actor
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    medians, peaks = {}, {}
    try:
        mesh = init_device_mesh(device, (1,))
        for n in counts:
            members = [FleetMember(f"m{i}", lora_rank=16, lora_alpha=32, lr=1e-4) for i in range(n)]
            model = build_fleet_model(model_dir, members, "all-linear", seed=0, dtype=dtype).to(device)
            model.routing.path = args.lora_path
            shard_fleet_model(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=dtype,
                                                                               reduce_dtype=torch.float32))
            optimizer = FleetOptimizer(model)
            rows = n * args.rows_per_member
            batch = {k: v.to(device) for k, v in random_batch(rows, args.prompt, args.response, vocab).items()}
            member_of_row = torch.arange(rows, device=device) % n
            tokens = int(batch["attention_mask"].sum())
            times = []
            for step in range(1, args.steps + 1):
                t0 = clock(device)
                batch["old_log_probs"] = log_probs(model, batch, member_of_row).float()
                t1 = clock(device)
                metrics = update_step(model, optimizer, batch, member_of_row, actor_cfg, micro_batch_rows=rows)
                t2 = clock(device)
                times.append(t2 - t0)
                losses = [metrics[f"fleet/m{i}/pg_loss"] for i in range(n)]
                print(f"gpu_smoke: fleet members={n} step {step}: {times[-1]:.3f} s (log-probs {t1 - t0:.3f}, "
                      f"update {t2 - t1:.3f}) rows={rows} tokens={tokens} "
                      f"pg_loss[m0]={losses[0]:.5f} members_stepped={sum(k.endswith('/grad_norm') for k in metrics)}")
            steady = times[1:] or times
            medians[n] = statistics.median(steady)
            if device == "cuda":
                peaks[n] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
            del model, optimizer, batch
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    finally:
        dist.destroy_process_group()
    # Against N separate runs, each stepping one member on its own rows: N x the one-member step (when the first
    # count is 1), so the last ratio is what a fleet step costs as a share of those N steps.
    base = medians[counts[0]] / counts[0]
    summary = ", ".join(
        f"N={n}: {t:.3f} s ({t / medians[counts[0]]:.2f}x the N={counts[0]} step, {t / (n * base):.2f}x N separate"
        + (f", peak {peaks[n]:.1f} GiB" if n in peaks else "") + ")"
        for n, t in medians.items())
    print(f"gpu_smoke: OK fleet median step at {args.rows_per_member} rows per member, backend={backend}: {summary}")
    return 0
