"""Fleet update over two FSDP2 ranks (gloo, two processes): every rank steps the same members, including a
member whose rows all sit on the other rank, so no member's shards end at different AdamW step counts."""

from __future__ import annotations

import pytest
import torch


def _rank(rank: int, model_dir: str, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from config import load_config
    from stages.train.fleet.members import FleetMember
    from stages.train.fleet.model import build_fleet_model, shard_fleet_model
    from stages.train.fleet.update import FleetOptimizer, update_step
    from tests.stages.train.toy_task import ragged_batch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        members = [FleetMember(name, lora_rank=4, lora_alpha=8, lr=1e-2) for name in ("a", "b", "c")]
        model = build_fleet_model(model_dir, members, ["q_proj", "v_proj", "lm_head"], seed=0, dtype=torch.float32)
        shard_fleet_model(model, mesh=init_device_mesh("cpu", (2,)))
        optimizer = FleetOptimizer(model)
        batch = ragged_batch(seed=7 + rank, rows=4)
        batch["response_mask"][:, 0] = 1  # every row has a token
        # "b" has rows on rank 0 only, "c" on rank 1 only
        member_of_row = torch.tensor([0, 0, 1, 1] if rank == 0 else [0, 0, 2, 2])
        update_step(model, optimizer, batch, member_of_row, load_config(None, []).actor_rollout_ref.actor,
                    micro_batch_rows=8)
        steps = {group["member"]: sorted({int(optimizer.adamw.state[p]["step"]) for p in group["params"]
                                          if p in optimizer.adamw.state})
                 for group in optimizer.adamw.param_groups}
        torch.save(steps, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_steps_every_member_that_has_rows_on_any_rank(tiny_model_dir, tmp_path):
    import torch.multiprocessing as mp

    from ground.ports import free_port

    mp.spawn(_rank, args=(str(tiny_model_dir), free_port(), str(tmp_path)), nprocs=2)
    steps = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert steps[0] == steps[1] == {"a": [1], "b": [1], "c": [1]}
