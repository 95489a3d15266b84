"""A group of FSDP2 actor workers on Ray: one per device (GPU), or `trainer.cpu_workers` on a CPU machine.

The group hides data parallelism from the trainer: it pads a batch to a multiple of the world size with
masked rows, gives each rank an equal contiguous slice (FSDP needs every rank to run the same number of
micro-batches), calls the method on all ranks at once and concatenates or averages what comes back.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def pad_batch(batch: dict, multiple: int) -> tuple[dict, int]:
    """Pad along dim 0 by repeating the last row with its masks zeroed; returns (batch, real row count)."""
    n = next(iter(batch.values())).shape[0]
    extra = (-n) % multiple
    if extra == 0:
        return batch, n
    out = {}
    for key, value in batch.items():
        filler = value[-1:].repeat(extra, *([1] * (value.dim() - 1)))
        if key == "response_mask":
            filler = torch.zeros_like(filler)
        out[key] = torch.cat([value, filler])
    return out, n


def split_batch(batch: dict, parts: int) -> list[dict]:
    n = next(iter(batch.values())).shape[0]
    size = n // parts
    return [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(parts)]


class WorkerGroup:
    """Starts one ActorWorker per bundle of `placement`, joins them into one process group, sets them up.

    The constructor returns once the workers are created and their setup is queued; `wait_ready()` blocks until
    every rank finished setup (so the caller can start the engine and load data meanwhile).
    """

    def __init__(self, cfg, model_dir: str, *, with_critic: bool, total_steps: int, placement=None,
                 device: str | None = None):
        """`placement`: a stages.train.placement.Placement whose group is reserved; without one (tests,
        benchmarks) the group makes its own for `device` and releases it at shutdown."""
        import ray

        from stages.train.actor_worker import ActorWorker

        self._own_placement = None
        if placement is None:
            from stages.train.placement import Placement, plan_placement

            placement = self._own_placement = Placement(plan_placement(cfg, device or "cpu"))
            placement.wait()
        plan = placement.plan
        self.world_size = plan.world_size
        device = plan.device
        # CPU workers share the cores: each gets its share of threads (vLLM sleeps while they compute).
        threads = max(1, (os.cpu_count() or 1) // self.world_size) if device == "cpu" else 4
        remote_cls = ray.remote(ActorWorker)
        cfg_dict = cfg.to_dict()
        self.workers = [
            remote_cls.options(**placement.worker_options(rank)).remote(
                rank, self.world_size, cfg_dict, model_dir, with_critic, total_steps, device, threads)
            for rank in range(self.world_size)
        ]
        # Rendezvous: rank 0's node hosts the store, on a port free there (not on the driver's host).
        master_addr, master_port = ray.get(self.workers[0].rendezvous_address.remote())
        log.info("actor group rendezvous at %s:%d (%s)", master_addr, master_port, "nccl" if device == "cuda" else "gloo")
        # A Ray actor runs its calls in order, so each rank's setup follows its own join without waiting here.
        for w in self.workers:
            w.init_distributed.remote(master_addr, master_port)
        self._setup_refs = [w.setup.remote() for w in self.workers]
        self.info: dict = {}
        self.placement_report: list[dict] = []

    def wait_ready(self) -> dict:
        """Wait for every rank's setup; returns rank 0's setup info (trainable params, dtype)."""
        import ray

        if not self.info:
            self.info = ray.get(self._setup_refs)[0]
            self.placement_report = ray.get([w.where.remote() for w in self.workers])
            log.info("actor group: %d worker(s) on %d node(s), %s trainable LoRA parameters, compute dtype %s",
                     self.world_size, len({p["node_id"] for p in self.placement_report}),
                     f"{self.info['trainable_params']:,}", self.info["dtype"])
        return self.info

    # ------------------------------------------------------------------------------------------------ calls
    def call(self, method: str, *args, **kwargs) -> list:
        """The same call on every rank; waits for all (and, the first time, for the ranks' setup)."""
        import ray

        self.wait_ready()
        return ray.get([getattr(w, method).remote(*args, **kwargs) for w in self.workers])

    def call_sharded(self, method: str, batch: dict, **kwargs) -> list:
        """Each rank gets its slice of `batch` (padded to a multiple of the world size)."""
        import ray

        self.wait_ready()
        padded, _ = pad_batch(batch, self.world_size)
        shards = split_batch(padded, self.world_size)
        return ray.get([getattr(w, method).remote(shard, **kwargs) for w, shard in zip(self.workers, shards)])

    def _concat(self, parts: list, n: int):
        if isinstance(parts[0], dict):
            return {k: torch.cat([p[k] for p in parts])[:n] for k in parts[0]}
        return torch.cat(parts)[:n]

    # ---------------------------------------------------------------------------------------- the API used
    def compute_log_probs(self, batch: dict, mode: str = "policy", with_entropy: bool = False) -> dict:
        n = batch["responses"].shape[0]
        return self._concat(self.call_sharded("compute_log_probs", batch, mode=mode, with_entropy=with_entropy), n)

    def compute_values(self, batch: dict) -> torch.Tensor:
        return self._concat(self.call_sharded("compute_values", batch), batch["responses"].shape[0])

    def update_actor(self, batch: dict, num_mini_batches: int, reuse_forward_as_old: bool) -> dict:
        return _mean_metrics(self.call_sharded("update_actor", batch, num_mini_batches=num_mini_batches,
                                               reuse_forward_as_old=reuse_forward_as_old))

    def update_critic(self, batch: dict, num_mini_batches: int) -> dict:
        return _mean_metrics(self.call_sharded("update_critic", batch, num_mini_batches=num_mini_batches))

    def gather_lora(self, layered: bool) -> dict:
        return self.call("gather_lora", layered=layered)[0]

    def sync_weights(self, out_dir: str, mode: str, layered: bool) -> dict:
        return self.call("sync_weights", out_dir, mode, layered)[0]

    def peft_config(self) -> dict:
        return self.call("peft_config")[0]

    def save_state(self, ckpt_dir: str) -> None:
        self.call("save_state", ckpt_dir)

    def load_state(self, ckpt_dir: str) -> dict:
        return self.call("load_state", ckpt_dir)[0]

    def shutdown(self) -> None:
        import ray

        try:
            ray.get([w.shutdown.remote() for w in self.workers], timeout=30)
        except Exception as exc:  # a dead worker must not stop the others from being killed
            log.debug("worker shutdown: %s", exc)
        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self._own_placement is not None:
            self._own_placement.remove()
            self._own_placement = None


def _mean_metrics(parts: list[dict]) -> dict:
    keys = parts[0].keys()
    return {k: sum(p[k] for p in parts) / len(parts) for k in keys}
