"""Where the actor ranks and the rollout engine run: one Ray placement group, colocated.

The decision (docs/training.md, "Placement"): OpenRLHF-style colocation in one placement group, which is also
what verl's hybrid engine does in effect.

- The group has one bundle per actor rank: `trainer.nnodes x trainer.n_gpus_per_node` bundles of one GPU each
  on CUDA, `trainer.cpu_workers` bundles on CPU. Its strategy is `trainer.placement_strategy` (PACK fills a
  node before the next; SPREAD puts bundles on different nodes where it can).
- Actor rank i takes a fractional share of bundle i's GPU (`ACTOR_GPU_SHARE`). Ray hands out GPUs by id: a
  worker asking for a whole GPU never fits on a GPU that the engine holds a share of, which is why the old
  `num_gpus: 1` workers plus a `num_gpus: 0.3` engine deadlocked on every 1- and 2-GPU machine.
- The rollout engine takes the rest of bundles 0 .. tp-1 (`rollout.tensor_model_parallel_size`), the same GPUs
  as ranks 0 .. tp-1. With tp = 1 the engine actor itself holds the share; with tp > 1 the engine actor holds
  only a CPU and vLLM's Ray executor starts one shard per bundle, told where by `VLLM_RAY_BUNDLE_INDICES` and
  how much by `VLLM_RAY_PER_WORKER_GPUS`. Memory is split by `rollout.gpu_memory_utilization` (vLLM's share
  of each GPU), not by these scheduling shares, which are bookkeeping for Ray.
- The engine always sits on rank 0's node (bundle 0), because rank 0 writes each weight sync to that node's
  /dev/shm and the engine reads it from there.

Ray's fractional shares are declarations, not limits; nothing here stops two processes from using one GPU,
which is the point of colocation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ground.errors import ConfigError, StageError

log = logging.getLogger(__name__)

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# Scheduling shares of one GPU; they must add up to at most 1 on a bundle.
ACTOR_GPU_SHARE = 0.6
ENGINE_GPU_SHARE = 0.4
PLACEMENT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class PlacementPlan:
    """What the placement group holds and who takes what; computed from the config alone (no Ray)."""

    device: str  # "cuda" or "cpu"
    world_size: int  # actor ranks
    tensor_parallel: int  # rollout engine shards (GPUs it spans)
    strategy: str
    bundles: list[dict] = field(default_factory=list)

    @property
    def engine_bundles(self) -> list[int]:
        return list(range(self.tensor_parallel)) if self.device == "cuda" else [0]


def plan_placement(cfg, device: str) -> PlacementPlan:
    """The bundles and shares for `cfg` on `device`; every impossible combination is a ConfigError here."""
    t = cfg.trainer
    tp = int(cfg.actor_rollout_ref.rollout.tensor_model_parallel_size)
    strategy = str(t.placement_strategy).upper()
    if strategy not in STRATEGIES:
        raise ConfigError(f"trainer.placement_strategy={t.placement_strategy!r} is not one of {', '.join(STRATEGIES)}. "
                          "Set trainer.placement_strategy=PACK (or SPREAD to put ranks on different nodes).")
    if device != "cuda":
        if t.cpu_workers < 1:
            raise ConfigError(f"trainer.cpu_workers={t.cpu_workers} must be >= 1.")
        # Bundle 0 holds rank 0 and the engine (one CPU each); the others one rank each.
        bundles = [{"CPU": 2}] + [{"CPU": 1} for _ in range(t.cpu_workers - 1)]
        return PlacementPlan("cpu", t.cpu_workers, 1, strategy, bundles)
    if t.nnodes < 1 or t.n_gpus_per_node < 1:
        raise ConfigError(f"trainer.nnodes={t.nnodes} and trainer.n_gpus_per_node={t.n_gpus_per_node} must both be "
                          ">= 1 on CUDA (actor ranks = nnodes x n_gpus_per_node).")
    world = t.nnodes * t.n_gpus_per_node
    if tp < 1 or tp > t.n_gpus_per_node or world % tp:
        raise ConfigError(
            f"actor_rollout_ref.rollout.tensor_model_parallel_size={tp} does not fit trainer.n_gpus_per_node="
            f"{t.n_gpus_per_node} x trainer.nnodes={t.nnodes}: the engine's shards share the GPUs of the actor ranks "
            f"on one node, so it must be between 1 and n_gpus_per_node and divide {world}. "
            f"Set it to a divisor of {t.n_gpus_per_node}, e.g. actor_rollout_ref.rollout.tensor_model_parallel_size=1.")
    # One GPU per bundle; bundle 0 also holds the engine's driver actor (a second CPU).
    bundles = [{"GPU": 1, "CPU": 2 if i == 0 else 1} for i in range(world)]
    return PlacementPlan("cuda", world, tp, strategy, bundles)


class Placement:
    """The placement group of a plan, and the Ray actor options that put each role on its bundle."""

    def __init__(self, plan: PlacementPlan, name: str | None = None):
        from ray.util.placement_group import placement_group

        self.plan = plan
        self.group = placement_group(plan.bundles, strategy=plan.strategy, name=name or "")
        self._ready = False

    def wait(self, timeout: float = PLACEMENT_TIMEOUT_S) -> None:
        """Block until Ray reserved every bundle; a StageError naming what is missing when it cannot."""
        import ray

        if self._ready:
            return
        ready, _ = ray.wait([self.group.ready()], timeout=timeout)
        if not ready:
            raise StageError(
                f"Ray could not reserve {len(self.plan.bundles)} bundles {self.plan.bundles} with strategy "
                f"{self.plan.strategy} within {timeout:.0f} s; the cluster has {ray.cluster_resources()} "
                f"({len(ray.nodes())} node(s)). Lower trainer.n_gpus_per_node / trainer.nnodes (GPU) or "
                "trainer.cpu_workers (CPU), set trainer.placement_strategy=PACK, or add nodes to the cluster.")
        self._ready = True

    def _in_bundle(self, index: int, capture_children: bool = False) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=index,
            placement_group_capture_child_tasks=capture_children)}

    def worker_options(self, rank: int) -> dict:
        """Ray actor options for actor rank `rank`: bundle `rank`, one CPU, a GPU share on CUDA."""
        options = {"num_cpus": 1, **self._in_bundle(rank)}
        if self.plan.device == "cuda":
            options["num_gpus"] = ACTOR_GPU_SHARE
        return options

    def engine_options(self) -> dict:
        """Ray actor options for the rollout engine (see the module docstring); env vars go in runtime_env."""
        plan = self.plan
        env: dict[str, str] = {}
        if plan.device != "cuda":
            return {"num_cpus": 1, **self._in_bundle(0), "runtime_env": {"env_vars": env}}
        if plan.tensor_parallel == 1:
            return {"num_cpus": 1, "num_gpus": ENGINE_GPU_SHARE, **self._in_bundle(0),
                    "runtime_env": {"env_vars": env}}
        # tp > 1: vLLM's Ray executor starts the shards inside this group (captured as child tasks).
        env["VLLM_RAY_PER_WORKER_GPUS"] = str(ENGINE_GPU_SHARE)
        env["VLLM_RAY_BUNDLE_INDICES"] = ",".join(str(i) for i in plan.engine_bundles)
        return {"num_cpus": 1, "num_gpus": 0, **self._in_bundle(0, capture_children=True),
                "runtime_env": {"env_vars": env}}

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        try:
            remove_placement_group(self.group)
        except Exception as exc:  # Ray already shut down: nothing left to release
            log.debug("placement group removal: %s", exc)
