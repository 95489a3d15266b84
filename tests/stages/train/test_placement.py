"""GPU placement, checked on this CPU machine with Ray's logical GPUs.

The real placement code (stages/train/placement.py) computes the placement group and each role's actor options;
stand-in actors take those options and report where they landed. The stand-in engine does what vLLM's Ray
executor does with tensor_model_parallel_size > 1: it reads VLLM_RAY_BUNDLE_INDICES / VLLM_RAY_PER_WORKER_GPUS
and starts one shard per bundle inside the current placement group.

One Ray cluster for the module: a head node without GPUs, and GPU nodes added and removed per scenario (a 2-GPU
machine for the seed's example, a 1-GPU machine, 2 nodes x 8 GPUs).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from config import load_config
from ground.errors import ConfigError, StageError

ROOT = Path(__file__).resolve().parents[3]
SEED_EXAMPLE = ROOT / "examples" / "qwen2_5_3b_gsm8k_grpo_lora.yaml"


class StandIn:
    """Reports its node and the GPUs Ray gave it; as an engine, starts its tensor-parallel shards like vLLM."""

    def where(self) -> dict:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}

    def start_shards(self) -> list[dict]:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundles = [int(b) for b in os.environ.get("VLLM_RAY_BUNDLE_INDICES", "").split(",") if b]
        share = float(os.environ.get("VLLM_RAY_PER_WORKER_GPUS", "1"))
        group = ray.util.get_current_placement_group()
        shard_cls = ray.remote(StandIn)
        shards = [shard_cls.options(num_cpus=0, num_gpus=share, scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=b)).remote() for b in bundles]
        return ray.get([s.where.remote() for s in shards], timeout=60)


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture
def gpu_nodes(cluster):
    """Adds nodes of logical GPUs to the cluster: gpu_nodes(count, gpus_each); removed after the test."""
    import ray

    added = []

    def add(count: int, gpus: int):
        for _ in range(count):
            added.append(cluster.add_node(num_cpus=gpus + 2, num_gpus=gpus))
        cluster.wait_for_nodes()
        deadline = time.time() + 30
        while ray.cluster_resources().get("GPU", 0) < count * gpus and time.time() < deadline:
            time.sleep(0.2)

    yield add
    for node in added:
        cluster.remove_node(node)
    deadline = time.time() + 30
    while ray.cluster_resources().get("GPU", 0) > 0 and time.time() < deadline:
        time.sleep(0.2)


def _place(cfg) -> dict:
    """Schedule every role of `cfg` as stand-ins through the real placement; returns where each landed."""
    import ray

    from stages.train.placement import Placement, plan_placement

    plan = plan_placement(cfg, "cuda")
    placement = Placement(plan)
    try:
        t0 = time.perf_counter()
        placement.wait(timeout=30)
        cls = ray.remote(StandIn)
        ranks = [cls.options(**placement.worker_options(r)).remote() for r in range(plan.world_size)]
        engine = cls.options(**placement.engine_options()).remote()
        where = ray.get([r.where.remote() for r in ranks], timeout=60)
        engine_where = ray.get(engine.where.remote(), timeout=60)
        shards = ray.get(engine.start_shards.remote(), timeout=60) if plan.tensor_parallel > 1 else [engine_where]
        seconds = time.perf_counter() - t0
        for actor in [*ranks, engine]:
            ray.kill(actor)
        return {"plan": plan, "ranks": where, "engine": engine_where, "shards": shards, "seconds": seconds}
    finally:
        placement.remove()


def _cfg(path=None, **overrides):
    return load_config(path, [f"{k}={v}" for k, v in overrides.items()])


def test_seed_two_gpu_example_schedules_ranks_and_tp2_engine_on_the_same_gpus(gpu_nodes):
    gpu_nodes(1, 2)
    cfg = _cfg(SEED_EXAMPLE)
    assert cfg.actor_rollout_ref.rollout.tensor_model_parallel_size == 2 and cfg.trainer.n_gpus_per_node == 2
    got = _place(cfg)
    assert got["seconds"] < 30
    gpus = [r["cuda_visible_devices"] for r in got["ranks"]]
    assert sorted(gpus) == ["0", "1"], gpus  # one GPU per rank
    assert [s["cuda_visible_devices"] for s in got["shards"]] == gpus  # shard i shares rank i's GPU
    assert len({r["node_id"] for r in got["ranks"] + got["shards"]}) == 1


def test_one_gpu_machine_colocates_rank_and_engine(gpu_nodes):
    gpu_nodes(1, 1)
    got = _place(_cfg(**{"trainer.n_gpus_per_node": 1}))
    assert got["seconds"] < 30
    assert got["ranks"][0]["cuda_visible_devices"] == got["engine"]["cuda_visible_devices"] == "0"


def test_two_nodes_of_eight_gpus_place_sixteen_ranks(gpu_nodes):
    gpu_nodes(2, 8)
    cfg = _cfg(**{"trainer.nnodes": 2, "trainer.n_gpus_per_node": 8,
                  "actor_rollout_ref.rollout.tensor_model_parallel_size": 4})
    got = _place(cfg)
    assert got["seconds"] < 60
    ranks = got["ranks"]
    per_node: dict[str, list[str]] = {}
    for r in ranks:
        per_node.setdefault(r["node_id"], []).append(r["cuda_visible_devices"])
    assert len(per_node) == 2
    for node_gpus in per_node.values():  # every GPU of both nodes holds exactly one rank
        assert sorted(node_gpus, key=int) == [str(i) for i in range(8)]
    # the engine's 4 shards sit on ranks 0-3's GPUs, on rank 0's node (where rank 0 writes the weight syncs)
    assert [(s["node_id"], s["cuda_visible_devices"]) for s in got["shards"]] == \
        [(r["node_id"], r["cuda_visible_devices"]) for r in ranks[:4]]
    assert got["engine"]["node_id"] == ranks[0]["node_id"]


def test_too_few_gpus_fail_with_what_is_missing(gpu_nodes):
    from stages.train.placement import Placement, plan_placement

    gpu_nodes(1, 1)
    placement = Placement(plan_placement(_cfg(**{"trainer.n_gpus_per_node": 2}), "cuda"))
    try:
        with pytest.raises(StageError, match="n_gpus_per_node"):
            placement.wait(timeout=3)
    finally:
        placement.remove()


def test_tensor_parallel_that_does_not_fit_is_a_config_error():
    from stages.train.placement import plan_placement

    with pytest.raises(ConfigError, match="tensor_model_parallel_size=4"):
        plan_placement(_cfg(**{"trainer.n_gpus_per_node": 2,
                               "actor_rollout_ref.rollout.tensor_model_parallel_size": 4}), "cuda")
    with pytest.raises(ConfigError, match="placement_strategy"):
        _cfg(**{"trainer.placement_strategy": "DIAGONAL"})
