"""Stage 2: train a LoRA adapter with RL (the equivalent of verl's main_ppo with LoRA).

`train(cfg, model_dir, base_fingerprint)` sets everything up in dependency order, runs `Trainer.fit` and returns
the outputs the later stages read. Heavy imports (torch, ray, vllm, mlflow) stay inside the functions so that
importing this package (e.g. for `pipeline --help`) is cheap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


def resolve_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        from ground.errors import ConfigError

        raise ConfigError("trainer.device=cuda but no CUDA device is visible; set trainer.device=auto or cpu.")
    return setting


def total_training_steps(cfg, steps_per_epoch: int) -> int:
    """verl's rule: trainer.total_training_steps when set, else total_epochs x batches per epoch."""
    if cfg.trainer.total_training_steps is not None:
        return int(cfg.trainer.total_training_steps)
    return int(cfg.trainer.total_epochs) * steps_per_epoch


def init_ray(cfg, workers: int) -> bool:
    """Join or start Ray; returns True when this call started it (and so must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray_init.address
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Logical CPUs: each worker and the engine take one; on a 2-core machine they time-share the cores.
        num_cpus = cfg.ray_init.num_cpus or max(os.cpu_count() or 1, workers + 2)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return True


def _start_engine(cfg, model_dir: str, sync_mode: str, seed: int, device: str):
    import ray

    from stages.train.rollout import RolloutEngine

    rollout = cfg.actor_rollout_ref.rollout
    max_len = rollout.max_model_len or (cfg.data.max_prompt_length + (rollout.response_length or cfg.data.max_response_length))
    options = {"num_cpus": 1, **({"num_gpus": 0.3} if device == "cuda" else {})}
    # vLLM logs every engine detail at INFO; inside a Ray actor that floods the driver's console and buries
    # the training progress bar. Warnings still show; VLLM_LOGGING_LEVEL in the environment wins.
    level = os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")
    # The engine core runs inside this actor's process, not in a subprocess of its own: a separate core starts
    # stepping as soon as the first request of a `generate` call reaches it, so how many requests share each
    # batch (and which draws of the seeded sampler each gets) would depend on timing, and the same seed would
    # give different rollouts. In-process, every request is queued before the first step.
    options["runtime_env"] = {"env_vars": {"VLLM_LOGGING_LEVEL": level, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}
    return ray.remote(**options)(RolloutEngine).remote(
        model_dir, rollout.model_dump(), lora_rank=cfg.actor_rollout_ref.model.lora_rank, max_model_len=max_len,
        seed=seed, sync_mode=sync_mode)


def train(cfg, model_dir: str, base_fingerprint: str | None = None, out_dir: str | None = None,
          parent_run_id: str | None = None, replace_outputs: bool = False) -> dict:
    """Train; returns the outputs for the next stages (see the keys at the end).

    A run that does not resume refuses an out folder or checkpoint folder holding an earlier run's files
    unless `replace_outputs` (`pipeline train --force`; the pipeline passes it for its own run directory)."""
    from stages.train.preflight import preflight

    t_start = time.perf_counter()
    model_dir = str(model_dir)
    # 1. Everything checkable without workers, so a config mistake costs a second, not a cluster start.
    preflight(cfg, model_dir)
    import ray
    import torch
    from transformers import AutoTokenizer

    from stages.train.prepare_data import ensure_data
    from stages.train import checkpoint
    from stages.train.data import BatchIterator, PromptDataset, data_fingerprint
    from stages.train.rewards import RewardFunction
    from stages.train.rollout import resolve_sync_mode
    from stages.train.sync_format import remove_sync_root, sync_root
    from stages.train.tracking import TrainTracking
    from stages.train.trainer import Trainer
    from stages.train.worker_group import WorkerGroup
    from ground.model_files import fingerprint

    device = resolve_device(cfg.trainer.device)
    sync_mode = resolve_sync_mode(cfg.actor_rollout_ref.rollout.lora_sync, device)
    out = Path(out_dir or cfg.trainer.default_local_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    base_fingerprint = base_fingerprint or fingerprint(Path(model_dir))

    # 2. Data and rewards (driver side): a bad row or scorer fails here, still before any worker.
    ensure_data(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_data = PromptDataset(cfg.data.train_files, tokenizer, cfg.data)
    val_data = PromptDataset(cfg.data.val_files, tokenizer, cfg.data, max_samples=cfg.data.val_max_samples)
    train_iter = BatchIterator(train_data.items, cfg.data.train_batch_size, cfg.data.shuffle, cfg.data.seed)
    reward_fn = RewardFunction(cfg)
    total_steps = total_training_steps(cfg, len(train_iter))
    lineage = {"base_fingerprint": base_fingerprint, "config_digest": cfg.digest(),
               "data_fingerprint": data_fingerprint(cfg.data.train_files)}

    # 3. Resume point (before tracking, so a resumed run continues its MLflow run).
    resume = checkpoint.find_resume_dir(cfg.trainer)
    checkpoint.check_fresh_start(out, cfg.trainer.default_local_dir, resume, replace=replace_outputs)
    state = checkpoint.read_trainer_state(resume) if resume else {}
    if state and state.get("config_digest") != lineage["config_digest"]:
        log.warning("resuming %s, written under a different config (digest %s, now %s)", resume,
                    str(state.get("config_digest"))[:12], lineage["config_digest"][:12])
    start_step = int(state.get("global_step", 0))
    tracking = TrainTracking(cfg, parent_run_id=parent_run_id, resume_run_id=state.get("mlflow_run_id"))
    tracking.set_tags({"base_fingerprint": base_fingerprint, "data_fingerprint": lineage["data_fingerprint"],
                       "config_digest": lineage["config_digest"], "sync_mode": sync_mode})

    # 4. Ray, then the engine (its start overlaps the workers' model loading), then the workers.
    owns_ray = init_ray(cfg, cfg.trainer.cpu_workers)
    run_key = hashlib.sha256(f"{out}:{os.getpid()}:{time.time()}".encode()).hexdigest()[:16]
    sync_dir = sync_root(run_key)
    engine = workers = None
    status = "FAILED"
    try:
        # A resumed run reseeds the engine past the steps already taken, so it does not replay their samples.
        engine = _start_engine(cfg, model_dir, sync_mode, cfg.actor_rollout_ref.rollout.seed + start_step, device)
        workers = WorkerGroup(cfg, model_dir, with_critic=_needs_critic(cfg), total_steps=total_steps, device=device)
        ray.get(engine.__ray_ready__.remote())
        history = []
        if not resume:
            (out / "history.jsonl").unlink(missing_ok=True)  # a fresh run in a reused folder starts a new history
        if resume:
            workers.load_state(str(resume))
            train_iter.load_state_dict(state["data"])
            history = _truncate_history(out / "history.jsonl", start_step)
            log.info("resumed from %s (step %d)", resume, start_step)
        trainer = Trainer(cfg, workers=workers, engine=engine, tokenizer=tokenizer, train_iter=train_iter,
                          val_items=val_data.items, reward_fn=reward_fn, tracking=tracking, sync_mode=sync_mode,
                          sync_dir=sync_dir, out_dir=out, total_steps=total_steps, start_step=start_step,
                          history=history)
        if "kl_coef" in state:
            trainer.kl_ctrl.value = state["kl_coef"]
        # 5. The engine starts from the actor's weights (they differ from the base when continuing an adapter
        #    or resuming), then validation of the starting point.
        trainer.sync()
        val_before = state.get("val_before")
        if val_before is None and cfg.trainer.val_before_train:
            val_before = trainer.validate()
            trainer.record({"step": start_step, **val_before})
            log.info("validation before training: %s", val_before)
        extra = {"val_before": val_before, **lineage}
        val_after = trainer.fit(extra)
        if val_after is None or trainer.history[-1].get("val/reward") is None:
            val_after = trainer.validate()
            trainer.record({"step": trainer.global_step, **val_after})
        # 6. The final adapter in PEFT format (lora_alpha kept) for the publish stage.
        adapter_dir = out / "adapter"
        from stages.train.sync_format import write_adapter

        write_adapter(adapter_dir, workers.gather_lora(layered=True), workers.peft_config())
        tracking.log_artifacts(str(adapter_dir), "adapter")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        for closer in (lambda: engine is not None and ray.get(engine.shutdown.remote(), timeout=60),
                       lambda: workers is not None and workers.shutdown(),
                       lambda: engine is not None and ray.kill(engine)):
            try:
                closer()
            except Exception as exc:  # keep closing the rest
                log.debug("cleanup: %s", exc)
        remove_sync_root(sync_dir)
        if owns_ray:
            ray.shutdown()
        tracking.end(status)

    phases = ("generate", "reference", "old_log_prob", "update", "sync", "step")
    steps = [h for h in trainer.history if "timing/step" in h]
    phase_seconds = {p: sum(h.get(f"timing/{p}", 0.0) for h in steps) / max(len(steps), 1) for p in phases}
    outputs = {
        "adapter_dir": str(adapter_dir),
        "history_path": str(trainer.history_path),
        "checkpoint_dir": str(Path(cfg.trainer.default_local_dir).expanduser().resolve()),
        "steps": trainer.global_step,
        "mlflow_run_id": tracking.run_id,
        "sync_mode": sync_mode,
        "val_reward_before": (val_before or {}).get("val/reward"),
        "val_reward_after": val_after.get("val/reward"),
        "val_acc_before": (val_before or {}).get("val/acc"),
        "val_acc_after": val_after.get("val/acc"),
        "phase_seconds": phase_seconds,
        "seconds": time.perf_counter() - t_start,
        **lineage,
    }
    (out / "train_outputs.json").write_text(json.dumps(outputs, indent=2))
    return outputs


def _needs_critic(cfg) -> bool:
    from stages.train.core_algos import needs_critic, resolve_adv_estimator_name

    return needs_critic(resolve_adv_estimator_name(cfg.algorithm.adv_estimator))


def _truncate_history(path: Path, step: int) -> list[dict]:
    """Keep the history up to the checkpoint's step: a killed run may have logged steps it will now redo."""
    if not path.is_file():
        return []
    kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [e for e in kept if e.get("step", 0) <= step]
    path.write_text("".join(json.dumps(e) + "\n" for e in kept))
    return kept
