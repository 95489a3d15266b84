"""The training recipe: `setup` (everything in dependency order), `fit` (the RL loop), `finish` (the adapter and
the outputs the later stages read). Teardown is one ExitStack: whatever setup started is closed in reverse
order, whether setup, fit or finish failed.

    with TrainRecipe(cfg, model_dir) as recipe:
        recipe.setup()
        recipe.fit()
        outputs = recipe.finish()

Start-up overlaps what does not depend on each other (the parts and their seconds are in `startup/*`): the
engine and the actor workers start as Ray actors at once; the data loads on the driver meanwhile; validation
of the starting point runs on the engine while the workers are still loading the model (a fresh LoRA adapter
has B = 0, so the engine's base weights already are the policy's).

Heavy imports (torch, ray, vllm, mlflow) stay inside the methods.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path

from ground.logs import adopt_library_loggers, console_is_ours, console_log, worker_log_env

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


def init_ray(cfg, bundles: list[dict]) -> bool:
    """Join or start Ray; returns True when this call started it (and so must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    # A cluster is joined only when named (ray_init.address, or RAY_ADDRESS as Ray itself reads it); otherwise a
    # new local one starts ("local"): Ray's default would join whatever /tmp/ray/ray_current_cluster names, even
    # the stale record of a run that was SIGKILLed, and then refuse our num_cpus.
    address = cfg.ray_init.address or os.environ.get("RAY_ADDRESS")
    # The run's log file, so every actor (and vLLM inside it) writes its output there, not to the console.
    log_env = worker_log_env()
    options = {"log_to_driver": True, "runtime_env": {"env_vars": log_env} if log_env else None}
    if console_is_ours():  # Ray's own notices go to the run's log file, through our handlers
        adopt_library_loggers()
        options["configure_logging"] = False
    if address:
        ray.init(address=address, **options)
    else:
        # Logical CPUs: enough for the placement group's bundles; on a 2-core machine they time-share the cores.
        needed = int(sum(b.get("CPU", 0) for b in bundles))
        num_cpus = cfg.ray_init.num_cpus or max(os.cpu_count() or 1, needed + 1)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **options)
    return True


def start_engine(cfg, model_dir: str, sync_mode: str, seed: int, placement):
    """The vLLM rollout engine as a Ray actor on the bundle(s) `placement` gives it; returns the handle at once."""
    import ray

    from stages.train.rollout import RolloutEngine

    rollout = cfg.actor_rollout_ref.rollout
    max_len = rollout.max_model_len or (cfg.data.max_prompt_length + (rollout.response_length or cfg.data.max_response_length))
    options = placement.engine_options()
    # vLLM logs every engine detail at INFO; inside a Ray actor that floods the driver's console and buries
    # the training progress bar. Warnings still show; VLLM_LOGGING_LEVEL in the environment wins.
    options["runtime_env"]["env_vars"]["VLLM_LOGGING_LEVEL"] = os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")
    # The engine core runs inside this actor's process, not in a subprocess of its own: a separate core starts
    # stepping as soon as the first request of a `generate` call reaches it, so how many requests share each
    # batch (and which draws of the seeded sampler each gets) would depend on timing, and the same seed would
    # give different rollouts. In-process, every request is queued before the first step.
    options["runtime_env"]["env_vars"]["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return ray.remote(RolloutEngine).options(**options).remote(
        model_dir, rollout.model_dump(), lora_rank=cfg.actor_rollout_ref.model.lora_rank, max_model_len=max_len,
        seed=seed, sync_mode=sync_mode)


def _quietly(what: str, fn, *args) -> None:
    """Run one teardown step; a failure is logged and the remaining steps still run."""
    try:
        fn(*args)
    except Exception as exc:
        log.debug("teardown (%s): %s", what, exc)


class TrainRecipe:
    """One training run. See the module docstring for the order of calls."""

    def __init__(self, cfg, model_dir: str, base_fingerprint: str | None = None, out_dir: str | None = None,
                 parent_run_id: str | None = None, replace_outputs: bool = False):
        self.cfg = cfg
        self.replace_outputs = replace_outputs
        self.model_dir = str(model_dir)
        self.base_fingerprint = base_fingerprint
        self.out = Path(out_dir or cfg.trainer.default_local_dir).expanduser().resolve()
        self.parent_run_id = parent_run_id
        self.status = "FAILED"  # what MLflow records unless finish() or a Ctrl-C says otherwise
        self.startup: dict[str, float] = {}
        self._stack = contextlib.ExitStack()
        self._t0 = time.perf_counter()

    # ---------------------------------------------------------------------------------------------- context
    def __enter__(self) -> "TrainRecipe":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is KeyboardInterrupt:
            self.status = "KILLED"
        self._stack.close()

    def _mark(self, part: str, since: float) -> None:
        self.startup[f"startup/{part}"] = round(time.perf_counter() - since, 3)

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Checks, Ray, placement, engine + workers + data in parallel, tracking, resume, validation before."""
        cfg = self.cfg
        from stages.train.placement import plan_placement
        from stages.train.preflight import preflight
        from stages.train.rollout import resolve_sync_mode

        # 1. Everything checkable without Ray, so a config mistake costs a second, not a cluster start.
        preflight(cfg, self.model_dir)
        self.device = resolve_device(cfg.trainer.device)
        self.sync_mode = resolve_sync_mode(cfg.actor_rollout_ref.rollout.lora_sync, self.device)
        plan = plan_placement(cfg, self.device)
        self.out.mkdir(parents=True, exist_ok=True)

        import ray

        from stages.train import checkpoint
        from stages.train.placement import Placement
        from stages.train.sync_format import remove_sync_root, sync_root
        from stages.train.worker_group import WorkerGroup

        # 2. The resume point decides the engine's seed, so it is read before anything starts.
        self.resume = checkpoint.find_resume_dir(cfg.trainer)
        # A fresh run must not mix its files with an earlier run's (unless told to replace them).
        checkpoint.check_fresh_start(self.out, cfg.trainer.default_local_dir, self.resume, replace=self.replace_outputs)
        self.state = checkpoint.read_trainer_state(self.resume) if self.resume else {}
        self.start_step = int(self.state.get("global_step", 0))

        # 3. Ray, then the placement group every actor is scheduled into (it fails with what is missing).
        t = time.perf_counter()
        if init_ray(cfg, plan.bundles):
            self._stack.callback(_quietly, "ray", ray.shutdown)
        self._mark("ray", t)
        t = time.perf_counter()
        self.placement = Placement(plan)
        self._stack.callback(_quietly, "placement group", self.placement.remove)
        self.placement.wait()
        self._mark("placement", t)
        run_key = hashlib.sha256(f"{self.out}:{os.getpid()}:{time.time()}".encode()).hexdigest()[:16]
        self.sync_dir = sync_root(run_key)
        self._stack.callback(_quietly, "sync dir", remove_sync_root, self.sync_dir)

        # 4. Engine and workers start together (separate processes); the data loads on the driver meanwhile.
        #    A resumed run reseeds the engine past the steps already taken, so it does not replay their samples.
        t_actors = time.perf_counter()
        self.engine = start_engine(cfg, self.model_dir, self.sync_mode,
                                   cfg.actor_rollout_ref.rollout.seed + self.start_step, self.placement)
        # Registered kill first so that, closing in reverse, the clean shutdown runs before the kill.
        self._stack.callback(_quietly, "engine kill", ray.kill, self.engine)
        self._stack.callback(_quietly, "engine shutdown", lambda: ray.get(self.engine.shutdown.remote(), timeout=60))
        total_steps_hint = self._load_data()  # also sets self.total_steps
        self.workers = WorkerGroup(cfg, self.model_dir, with_critic=_needs_critic(cfg), total_steps=total_steps_hint,
                                   placement=self.placement)
        self._stack.callback(_quietly, "workers", self.workers.shutdown)
        self._start_tracking()

        ray.get(self.engine.__ray_ready__.remote())
        self._mark("engine", t_actors)
        self.trainer = self._build_trainer()
        # 5. A fresh adapter (B = 0) is the base: validate it on the engine while the workers still load.
        fresh = not self.resume and not cfg.actor_rollout_ref.model.lora_adapter_path
        self.val_before = self.state.get("val_before")
        if fresh and self.val_before is None and cfg.trainer.val_before_train:
            self._validate_before()
        self.workers.wait_ready()
        self._mark("workers", t_actors)
        if self.resume:
            self.workers.load_state(str(self.resume))
            self.train_iter.load_state_dict(self.state["data"])
            log.info("resumed from %s (step %d)", self.resume, self.start_step)
        if not fresh:
            # The engine starts from the actor's weights: they differ from the base when continuing or resuming.
            self.trainer.sync()
            if self.val_before is None and cfg.trainer.val_before_train:
                self._validate_before()
        self._mark("total", self._t0)
        self.trainer.record({"step": self.start_step, **self.startup})
        log.info("start-up: %s", " ".join(f"{k.split('/')[1]}={v:.1f}s" for k, v in self.startup.items()))

    def _load_data(self) -> int:
        from transformers import AutoTokenizer

        from ground.model_files import fingerprint
        from stages.train.prepare_data import ensure_data
        from stages.train.data import BatchIterator, PromptDataset, data_fingerprint
        from stages.train.rewards import RewardFunction

        cfg, t = self.cfg, time.perf_counter()
        ensure_data(cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        train_data = PromptDataset(cfg.data.train_files, self.tokenizer, cfg.data)
        self.val_items = PromptDataset(cfg.data.val_files, self.tokenizer, cfg.data,
                                       max_samples=cfg.data.val_max_samples).items
        self.train_iter = BatchIterator(train_data.items, cfg.data.train_batch_size, cfg.data.shuffle, cfg.data.seed)
        self.reward_fn = RewardFunction(cfg)
        self.total_steps = total_training_steps(cfg, len(self.train_iter))
        self.lineage = {"base_fingerprint": self.base_fingerprint or fingerprint(Path(self.model_dir)),
                        "config_digest": cfg.digest(), "data_fingerprint": data_fingerprint(cfg.data.train_files)}
        if self.state and self.state.get("config_digest") != self.lineage["config_digest"]:
            log.warning("resuming %s, written under a different config (digest %s, now %s)", self.resume,
                        str(self.state.get("config_digest"))[:12], self.lineage["config_digest"][:12])
        self._mark("data", t)
        return self.total_steps

    def _start_tracking(self) -> None:
        """MLflow run (continued when resuming); ended last, with the run's status."""
        from stages.train.tracking import TrainTracking

        t = time.perf_counter()
        self.tracking = TrainTracking(self.cfg, parent_run_id=self.parent_run_id,
                                      resume_run_id=self.state.get("mlflow_run_id"), out_dir=str(self.out))
        self._stack.callback(lambda: self.tracking.end(self.status))
        self.tracking.set_tags({**self.lineage, "sync_mode": self.sync_mode, "device": self.device,
                                "placement": f"{self.placement.plan.world_size} rank(s), {self.placement.plan.strategy}"})
        self._mark("tracking", t)

    def _build_trainer(self):
        from stages.train.trainer import Trainer

        history = []
        history_path = self.out / "history.jsonl"
        if self.resume:
            history = _truncate_history(history_path, self.start_step)
        else:
            history_path.unlink(missing_ok=True)  # a fresh run in a reused folder starts a new history
        trainer = Trainer(self.cfg, workers=self.workers, engine=self.engine, tokenizer=self.tokenizer,
                          train_iter=self.train_iter, val_items=self.val_items, reward_fn=self.reward_fn,
                          tracking=self.tracking, sync_mode=self.sync_mode, sync_dir=self.sync_dir, out_dir=self.out,
                          total_steps=self.total_steps, start_step=self.start_step, history=history)
        if "kl_coef" in self.state:
            trainer.kl_ctrl.value = self.state["kl_coef"]
        return trainer

    def _validate_before(self) -> None:
        from stages.train.trainer import brief_metrics

        t = time.perf_counter()
        self.val_before = self.trainer.validate()
        self.trainer.record({"step": self.start_step, **self.val_before})
        console_log("validation before training: %s", brief_metrics(self.val_before))
        self._mark("val_before", t)

    # -------------------------------------------------------------------------------------------------- fit
    def fit(self) -> None:
        """The RL loop (Trainer.fit), then a final validation when the last step did not run one."""
        self.val_after = self.trainer.fit({"val_before": self.val_before, **self.lineage})
        if self.val_after is None or self.trainer.history[-1].get("val/reward") is None:
            self.val_after = self.trainer.validate()
            self.trainer.record({"step": self.trainer.global_step, **self.val_after})

    # ----------------------------------------------------------------------------------------------- finish
    def finish(self) -> dict:
        """The final adapter in PEFT format (lora_alpha kept) and the outputs for the next stages."""
        from stages.train.sync_format import write_adapter

        adapter_dir = self.out / "adapter"
        write_adapter(adapter_dir, self.workers.gather_lora(layered=True), self.workers.peft_config())
        self.tracking.log_artifacts(str(adapter_dir), "adapter")
        self.status = "FINISHED"
        trainer, val_before, val_after = self.trainer, self.val_before or {}, self.val_after
        phases = ("generate", "reference", "old_log_prob", "update", "sync", "step")
        steps = [h for h in trainer.history if "timing/step" in h]
        outputs = {
            "adapter_dir": str(adapter_dir),
            "history_path": str(trainer.history_path),
            "val_generations": trainer.val_generations,  # trainer.log_val_generations samples of the last validation
            "checkpoint_dir": str(Path(self.cfg.trainer.default_local_dir).expanduser().resolve()),
            "steps": trainer.global_step,
            "mlflow_run_id": self.tracking.run_id,
            "loggers": self.tracking.destinations,  # where each of trainer.logger's trackers wrote
            "sync_mode": self.sync_mode,
            "val_reward_before": val_before.get("val/reward"),
            "val_reward_after": val_after.get("val/reward"),
            "val_acc_before": val_before.get("val/acc"),
            "val_acc_after": val_after.get("val/acc"),
            "phase_seconds": {p: sum(h.get(f"timing/{p}", 0.0) for h in steps) / max(len(steps), 1) for p in phases},
            "rollout_mismatch": rollout_mismatch(trainer.history),
            "startup_seconds": {k.split("/", 1)[1]: v for k, v in self.startup.items()},
            "placement": self.workers.placement_report,
            "seconds": time.perf_counter() - self._t0,
            **self.lineage,
        }
        (self.out / "train_outputs.json").write_text(json.dumps(outputs, indent=2))
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


def rollout_mismatch(history: list[dict]) -> dict | None:
    """Mean rollout_corr/ metrics over the steps that logged them (calculate_log_probs=true); None otherwise."""
    rows = [h for h in history if "rollout_corr/k3_kl" in h]
    if not rows:
        return None
    keys = ("kl", "k3_kl", "log_ppl_abs_diff", "chi2_token")
    return {"steps": len(rows), **{k: sum(h[f"rollout_corr/{k}"] for h in rows) / len(rows) for k in keys}}
