"""One FSDP2 actor worker: a Ray actor holding one shard of the LoRA policy (and the PPO critic).

Every worker of a group runs the same method on its own slice of the batch at the same time (the group does
that, see worker_group.py): FSDP2 gathers and reduce-scatters inside forward and backward, so all ranks must
make the same sequence of calls with the same number of micro-batches.

Precision: on GPU the base computes in bf16 (FSDP2 MixedPrecisionPolicy) with float32 LoRA master weights and
float32 gradient reduction. On CPU the default is the model's stored dtype (float32 for the tiny test model),
because the log-prob match against vLLM and the PPO ratio are tighter in float32. The CPU demo sets
`model.dtype=float32` for SmolLM2-135M, whose packaged weights are bf16: this machine's bf16 matmuls are slower
than its fp32 ones (update 10.8 s per step against 16.7 s in the demo).
"""

from __future__ import annotations

import logging
import math
import os
import time

import torch
import torch.distributed as dist

from ground.logs import redirect_process_output
from stages.train import gather, shared_prompt
from stages.train.modeling import build_model, peft_config_dict, response_log_probs, token_log_probs

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, model_dir: str, device: str) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device == "cuda":
        return torch.bfloat16
    import json

    from ground.model_files import stored_dtype

    with open(os.path.join(model_dir, "config.json")) as f:
        return DTYPES.get(stored_dtype(json.load(f)), torch.float32)


def _warmup_lambda(warmup_steps: int):
    # Linear warmup, then constant (verl's default schedule for the actor).
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


class ActorWorker:
    """Rank `rank` of `world_size`; `setup()` must run on all ranks before anything else."""

    def __init__(self, rank: int, world_size: int, cfg: dict, model_dir: str,
                 with_critic: bool, total_steps: int, device: str, threads: int):
        from config import Config

        redirect_process_output(f"rank {rank}")  # into the run's log file: Ray would copy it to the console
        self.rank, self.world_size = rank, world_size
        self.cfg = Config.model_validate(cfg)
        self.model_dir = model_dir
        self.with_critic = with_critic
        self.total_steps = total_steps
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        torch.set_num_threads(max(1, threads))

    # ------------------------------------------------------------------------------------------ rendezvous
    def rendezvous_address(self) -> tuple[str, int]:
        """(this node's IP, a TCP port free on this node): asked of rank 0, whose node hosts the store."""
        import ray

        from ground.ports import free_port

        return ray.util.get_node_ip_address(), free_port("")

    def where(self) -> dict:
        """Where Ray placed this rank: node id and IP, and the devices it sees."""
        import ray

        return {"rank": self.rank, "node_id": ray.get_runtime_context().get_node_id(),
                "node_ip": ray.util.get_node_ip_address(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}

    def init_distributed(self, master_addr: str, master_port: int) -> None:
        """Join the process group at rank 0's address: NCCL on CUDA, gloo on CPU."""
        # Ray assigns each GPU actor its own CUDA_VISIBLE_DEVICES, so device 0 is this worker's GPU.
        # Binding the device before the group forms lets NCCL build its communicator on this GPU at once, instead
        # of guessing the device from the global rank (wrong when ranks per node differ, as PyTorch warns).
        backend, device_id = "gloo", None
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            backend, device_id = "nccl", self.device
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                                world_size=self.world_size, device_id=device_id)

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> dict:
        """Model -> LoRA -> FSDP2 shards -> optimizers and schedulers, in that order (each needs the one before)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from stages.train import fsdp_setup
        from stages.train.sharded_load import fill_shards

        arr = self.cfg.actor_rollout_ref
        dtype = resolve_dtype(arr.model.dtype, self.model_dir, self.device.type)
        self.compute_dtype = dtype
        sharded = arr.actor.fsdp_config.load_weights in ("sharded", "rank0")
        # 1. The same seeded LoRA init on every rank (sharding then keeps each rank's slice of one tensor). With
        #    sharded loading the base is built on the meta device: no rank holds a whole copy of it.
        self.model = build_model(self.model_dir, arr.model, with_critic=self.with_critic, seed=self.cfg.trainer.seed,
                                 dtype=dtype, on_meta=sharded)
        if not sharded:
            self.model = self.model.to(self.device)
        # 2. FSDP2: one shard group per decoder layer (its gather is the unit of memory), then the root for the
        #    embeddings, norm, lm_head and value head; mixed precision and offload from fsdp_config.
        shard_kwargs = fsdp_setup.fully_shard_kwargs(arr, self.device.type, dtype)
        # FSDP2's default mesh is a CUDA one whenever a GPU is visible, so a worker told to run on CPU on a GPU
        # machine would get its shards moved to the GPU: name the worker's own device.
        shard_kwargs["mesh"] = init_device_mesh(self.device.type, (self.world_size,))
        for layer in self.model.decoder_layers():
            fully_shard(layer, **shard_kwargs)
        fully_shard(self.model, **shard_kwargs)
        if sharded:  # each rank reads only the rows of each base tensor that its shard holds
            fill_shards(self.model, self.model_dir, self.device, show_progress=self.rank == 0,
                        from_rank0=arr.actor.fsdp_config.load_weights == "rank0")
        # 3. Optimizers over trainable parameters only: the frozen base never enters AdamW's state.
        self.actor_params = [p for n, p in self.model.named_parameters() if p.requires_grad and gather.is_policy_lora(n)]
        self.optimizer, self.scheduler = self._optimizer(self.actor_params, arr.actor.optim)
        self.critic_params, self.critic_optimizer, self.critic_scheduler = [], None, None
        if self.with_critic:
            self.critic_params = [p for n, p in self.model.named_parameters()
                                  if p.requires_grad and not gather.is_policy_lora(n)]
            self.critic_optimizer, self.critic_scheduler = self._optimizer(self.critic_params, self.cfg.critic.optim)
        if fsdp_setup.wants_optimizer_hooks(arr, self.device.type):
            for opt in (self.optimizer, self.critic_optimizer):
                if opt is not None:
                    fsdp_setup.offload_optimizer_between_steps(opt, self.device)
        n_train = sum(p.numel() for p in self.actor_params)
        return {"trainable_params": n_train, "dtype": str(dtype).replace("torch.", ""),
                "critic_params": sum(p.numel() for p in self.critic_params)}

    def _optimizer(self, params, optim_cfg):
        opt = torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas),
                                weight_decay=optim_cfg.weight_decay)
        warmup = optim_cfg.lr_warmup_steps
        if warmup < 0:
            warmup = int(optim_cfg.lr_warmup_steps_ratio * self.total_steps)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, _warmup_lambda(warmup))

    def peft_config(self) -> dict:
        return peft_config_dict(self.model)

    # ------------------------------------------------------------------------------------------- forwards
    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    def _forward_log_probs(self, mb: dict, mode: str, temperature: float, with_entropy: bool,
                           entropy_grad: bool = False):
        """(log_probs [b, R], entropy [b, R] or None). entropy_grad: the entropy joins the loss; otherwise it is
        a metric, computed without autograd so its softmax is not kept for a backward that never reaches it
        (one float32 [b, R, V] tensor less at the peak)."""
        from stages.train.core_algos import entropy_from_logits

        if self.cfg.actor_rollout_ref.model.share_prompt_forward:  # each prompt once for all its responses
            predicting = shared_prompt.forward_response_logits(self.model, mb, mode, self.compute_dtype)
            log_probs, resp_logits = token_log_probs(predicting, mb["responses"], temperature)
        else:  # only the R + 1 last positions' logits are read (response_log_probs slices [-R-1:-1])
            logits = self.model(mb["input_ids"], mb["attention_mask"], mb["position_ids"], mode=mode,
                                logits_to_keep=mb["responses"].shape[1] + 1)
            log_probs, resp_logits = response_log_probs(logits, mb["responses"], temperature)
        entropy = None
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                entropy = entropy_from_logits(resp_logits)
        return log_probs, entropy

    def _micro_batches(self, batch: dict, max_rows: int, max_tokens: int | None) -> list:
        """Micro-batches of `batch` (micro_batching.py): sorted and trimmed with use_remove_padding, cut by
        `max_tokens` with dynamic batch size; every rank gets as many as the rank that needs the most."""
        from stages.train.micro_batching import plan_rows, row_lengths, split_to_count, take

        model_cfg = self.cfg.actor_rollout_ref.model
        trim = model_cfg.use_remove_padding
        order = shared_prompt.group_order(batch) if model_cfg.share_prompt_forward else None  # whole prompt groups
        groups = plan_rows(row_lengths(batch).tolist(), max_rows=max_rows, max_tokens=max_tokens, sort=trim,
                           order=order)
        if max_tokens and self.world_size > 1:  # FSDP's collectives need the same count on every rank
            count = torch.tensor([len(groups)], device=self.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            groups = split_to_count(groups, int(count.item()))
        return [take(batch, g, trim) for g in groups]

    def _log_prob_budget(self) -> int | None:
        rollout, actor = self.cfg.actor_rollout_ref.rollout, self.cfg.actor_rollout_ref.actor
        dynamic = actor.use_dynamic_bsz if rollout.log_prob_use_dynamic_bsz is None else rollout.log_prob_use_dynamic_bsz
        if not dynamic:
            return None
        return rollout.log_prob_max_token_len_per_gpu or actor.ppo_max_token_len_per_gpu

    @torch.no_grad()
    def compute_log_probs(self, batch: dict, mode: str = "policy", with_entropy: bool = False) -> dict:
        """mode policy: old log-probs (current weights); mode ref: adapter disabled. Returns CPU tensors [b, R].
        Micro-batches of rollout.log_prob_micro_batch_size_per_gpu rows, or ref.'s own for the reference pass."""
        from stages.train.micro_batching import scatter_rows

        self.model.eval()
        arr = self.cfg.actor_rollout_ref
        temperature = arr.rollout.temperature
        size = (arr.ref if mode == "ref" else arr.rollout).log_prob_micro_batch_size_per_gpu
        n, r = batch["responses"].shape
        outs, ents = [], []
        for mb in self._micro_batches(self._to_device(batch), size, self._log_prob_budget()):
            lp, ent = self._forward_log_probs(mb.data, mode, temperature, with_entropy)
            outs.append((mb, lp.cpu()))
            if ent is not None:
                ents.append((mb, ent.cpu()))
        result = {"log_probs": scatter_rows(outs, n, r)}
        if ents:
            result["entropy"] = scatter_rows(ents, n, r)
        return result

    def compute_values(self, batch: dict) -> torch.Tensor:
        from stages.train.critic_passes import compute_values

        return compute_values(self, batch)

    # -------------------------------------------------------------------------------------------- updates
    def update_actor(self, batch: dict, num_mini_batches: int, reuse_forward_as_old: bool) -> dict:
        """PPO epochs over mini-batches (one optimizer step each) of micro-batches (gradient accumulation).

        With actor.shuffle the rows are dealt into mini-batches in a new seeded order each epoch (verl's
        shuffle; micro_batching.mini_batch_rows), else in order.

        reuse_forward_as_old: with one epoch over one mini-batch the policy has not moved when each micro-batch
        is evaluated, so the old log-probs equal this forward's own (detached) values and the trainer skipped
        the separate old-log-prob pass.
        """
        from stages.train import rollout_corr
        from stages.train.core_algos import agg_loss, get_policy_loss_fn, kl_penalty
        from stages.train.micro_batching import loss_weight, mini_batch_rows, shuffle_seed

        actor = self.cfg.actor_rollout_ref.actor
        temperature = self.cfg.actor_rollout_ref.rollout.temperature
        policy_loss = get_policy_loss_fn(actor.policy_loss.loss_mode)
        rc = self.cfg.algorithm.rollout_correction
        self.model.train()
        batch = self._to_device(batch)
        n = batch["responses"].shape[0]
        mini = math.ceil(n / num_mini_batches)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}

        def record(key, value):
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1

        update = self.scheduler.last_epoch  # this update's number (restored on resume): the shuffle's seed
        for epoch in range(actor.ppo_epochs):
            seed = shuffle_seed(self.cfg.trainer.seed, update, epoch)
            for rows in mini_batch_rows(n, mini, shuffle=actor.shuffle, seed=seed):
                mini_batch = {k: v.index_select(0, rows.to(v.device)) for k, v in batch.items()}
                budget = actor.ppo_max_token_len_per_gpu if actor.use_dynamic_bsz else None
                mbs = self._micro_batches(mini_batch, actor.ppo_micro_batch_size_per_gpu, budget)
                self.optimizer.zero_grad(set_to_none=True)
                for micro in mbs:
                    # Each micro-batch's share of the mini-batch loss, so grouping does not change the gradient.
                    weight = loss_weight(micro, mini_batch["response_mask"], actor.loss_agg_mode)
                    mb = micro.data
                    mask = mb["response_mask"]
                    # entropy is always a per-step metric (one softmax over the response); it needs autograd
                    # only when entropy_coeff puts it in the loss
                    log_prob, entropy = self._forward_log_probs(mb, "policy", temperature, True,
                                                                entropy_grad=bool(actor.entropy_coeff))
                    old = log_prob.detach() if reuse_forward_as_old else mb["old_log_probs"]
                    advantages = mb["advantages"]
                    if "rollout_log_probs" in mb:  # the engine's own log-probs: measure, and correct if asked
                        # bypass mode: old *is* the engine's, so the actor's side is this forward's
                        actor_side = log_prob if rc.bypass_mode else old
                        advantages, mask, corr_metrics = rollout_corr.correct(
                            rc, actor_side, mb["rollout_log_probs"], advantages, mask)
                        for key, value in corr_metrics.items():
                            record(key, value)
                    loss, pg_metrics = policy_loss(old, log_prob, advantages, mask, actor.loss_agg_mode, actor)
                    if actor.entropy_coeff:
                        loss = loss - actor.entropy_coeff * agg_loss(entropy, mask, actor.loss_agg_mode)
                    if actor.use_kl_loss:
                        kl = agg_loss(kl_penalty(log_prob, mb["ref_log_probs"], actor.kl_loss_type), mask,
                                      actor.loss_agg_mode)
                        loss = loss + actor.kl_loss_coef * kl
                        record("actor/kl_loss", kl.item())
                    if mask.sum() == 0:  # a padding-only micro-batch still joins FSDP's collectives
                        loss = log_prob.sum() * 0.0
                    (loss * weight).backward()
                    record("actor/pg_loss", loss.item())
                    record("actor/entropy", agg_loss(entropy.detach(), mask, "token-mean").item() if mask.sum() else 0.0)
                    for key, value in pg_metrics.items():
                        record(f"actor/{key}", value)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.actor_params, actor.grad_clip)
                grad_norm = float(gather.full_tensor(grad_norm))
                if math.isfinite(grad_norm):
                    self.optimizer.step()
                else:  # a non-finite gradient would poison the LoRA weights for good; skip this step
                    log.warning("actor grad norm is %s; skipping the optimizer step", grad_norm)
                record("actor/grad_norm", grad_norm)
        record("actor/lr", self.scheduler.get_last_lr()[0])
        self.scheduler.step()
        return {k: sums[k] / counts[k] for k in sums}

    def update_critic(self, batch: dict, num_mini_batches: int) -> dict:
        from stages.train.critic_passes import update_critic

        return update_critic(self, batch, num_mini_batches)

    # ------------------------------------------------------------------------------------- gather / sync
    def gather_lora(self, layered: bool) -> dict | None:
        """The policy's LoRA tensors in PEFT's saved names, full (unsharded), on rank 0; None elsewhere."""
        tensors = gather.gather_lora(self.model, layered=layered)
        return tensors if self.rank == 0 else None

    def sync_weights(self, out_dir: str, mode: str, layered: bool) -> dict:
        """Gather and write what the rollout engine loads next: a PEFT adapter dir or a merged model dir.

        All ranks take part in the gathers; rank 0 writes (to /dev/shm by default, so writing costs a memcpy).
        """
        from stages.train.sync_format import MergedModelWriter, write_adapter

        t0 = time.perf_counter()
        if mode == "adapter":
            tensors = gather.gather_lora(self.model, layered=layered)
            nbytes = write_adapter(out_dir, tensors, self.peft_config()) if self.rank == 0 else 0
        elif mode == "merged":
            writer = MergedModelWriter(out_dir, self.model_dir) if self.rank == 0 else None
            for layer_tensors in gather.iter_merged_layers(self.model, out_dtype=self.merged_dtype()):
                if writer is not None:
                    writer.add(layer_tensors)
            nbytes = writer.finish() if writer is not None else 0
        else:
            raise ValueError(f"unknown sync mode {mode!r}")
        dist.barrier()  # the engine must not read before rank 0 has finished writing
        return {"bytes": nbytes, "seconds": time.perf_counter() - t0}

    def merged_dtype(self) -> torch.dtype:
        """Merged weights travel in the dtype the engine computes in (the rollout's dtype)."""
        return resolve_dtype(self.cfg.actor_rollout_ref.rollout.dtype, self.model_dir, self.device.type)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_state(self, ckpt_dir: str) -> None:
        from stages.train import checkpoint

        checkpoint.save_worker_state(self, ckpt_dir)

    def load_state(self, ckpt_dir: str) -> dict:
        from stages.train import checkpoint

        return checkpoint.load_worker_state(self, ckpt_dir)

    def memory_stats(self, reset_peaks: bool = False) -> dict:
        """This worker's peak resident host memory (bytes; Linux VmHWM) and, on CUDA, peak allocated GPU memory,
        since the start or the last reset. reset_peaks: start a new window after reading (to measure one step)."""
        stats = {"rank": self.rank, **_host_memory()}
        if self.device.type == "cuda":
            stats["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
            if reset_peaks:
                torch.cuda.reset_peak_memory_stats(self.device)
        if reset_peaks:
            try:  # "5" resets the peak resident set size (Linux >= 4.0)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError as exc:
                log.debug("cannot reset the peak RSS: %s", exc)
        return stats

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _host_memory() -> dict:
    """Peak and current resident memory of this process in bytes (/proc/self/status, else getrusage)."""
    try:
        fields = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith(("VmHWM", "VmRSS")))
        return {"peak_rss_bytes": int(fields["VmHWM"].split()[0]) * 1024,
                "rss_bytes": int(fields["VmRSS"].split()[0]) * 1024}
    except (OSError, KeyError, ValueError):
        import resource

        return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
