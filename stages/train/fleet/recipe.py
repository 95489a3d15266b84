"""A fleet run: one Ray, one rollout engine, one actor, every member trained at once (issue #28).

    outcome = FleetRun(fleet_cfg, model_dir, out_dir, fail_fast=False).run()

One step: for each member still running, its next batch of prompts -> the engine with that member's adapter
(one call per member, or one mixed multi-LoRA call: fleet/rollout.py) -> its reward -> its advantages (the shared
adv_estimator over its own groups); then one batch of every member's rows -> old log-probs -> the fleet update
(per-member token-mean, a parameter group per member) -> each member's adapter written and reloaded in the engine.

A member whose data cannot be read or whose reward raises is marked failed with its error, printed once, and
left out of later steps; the others go on (fail_fast: the run stops). What is not wired yet (several ranks,
the GPU path) is listed in docs/training.md, "Fleet training".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ground.errors import StageError
from ground.logs import console_log, worker_log_env
from stages.train.fleet.config import FleetConfig, MemberSpec

log = logging.getLogger(__name__)

OUTCOME_FILE = "fleet_outcome.json"


@dataclass
class MemberRun:
    spec: MemberSpec
    status: str = "running"  # running -> finished | failed
    error: dict | None = None
    train_iter: object = None
    reward_fn: object = None
    val_items: list = field(default_factory=list)
    last: dict = field(default_factory=dict)  # the member's metrics of its last step
    val_before: dict | None = None
    val_after: dict | None = None

    @property
    def name(self) -> str:
        return self.spec.name


class MemberFailed(StageError):
    """--fail-fast: a member failed, so the fleet stops."""


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else 0.0


class FleetRun:
    def __init__(self, fleet: FleetConfig, model_dir: str, out_dir: str | Path, *, fail_fast: bool = False,
                 resume: bool = False, start_folders: dict[int, str] | None = None, parent_run_id: str | None = None):
        """parent_run_id: the pipeline's MLflow parent run, under which the fleet's run nests (fleet/tracking.py)."""
        self.fleet, self.cfg = fleet, fleet.shared
        from stages.train.fleet.rollout import BatchingChoice

        self.batching = BatchingChoice(fleet.rollout_batching)
        self.model_dir = str(model_dir)
        self.out = Path(out_dir).expanduser().resolve()
        self.fail_fast, self.resume_wanted = fail_fast, resume
        self.start_folders = dict(start_folders or {})
        self.members = [MemberRun(spec) for spec in fleet.members]
        self.history: list[dict] = []
        self.global_step = 0
        self.parent_run_id = parent_run_id
        self.tracking = None  # FleetTracking, started once the workers are up

    # ------------------------------------------------------------------------------------------ failures
    def _fail(self, member: MemberRun, exc: BaseException) -> None:
        member.status = "failed"
        member.error = {"type": type(exc).__name__, "message": str(exc), "step": self.global_step + 1}
        console_log("fleet member %s failed at step %d: %s: %s", member.name, self.global_step + 1,
                    type(exc).__name__, exc)
        if self.fail_fast:
            raise MemberFailed(f"fleet member {member.name} failed ({type(exc).__name__}: {exc}); --fail-fast stops "
                               "the whole fleet. Fix that member or run without --fail-fast to let the others "
                               "go on.") from exc

    def live(self) -> list[int]:
        return [i for i, m in enumerate(self.members) if m.status == "running"]

    # ---------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        with contextlib.ExitStack() as stack:
            try:
                self._setup(stack)
                self._fit()
            except MemberFailed:
                self._write_outcome(stopped=True)
                raise
            return self._finish()

    def _setup(self, stack: contextlib.ExitStack) -> None:
        import ray
        from transformers import AutoTokenizer

        from stages.train import checkpoint
        from stages.train.data import BatchIterator, PromptDataset
        from stages.train.recipe import init_ray, resolve_device, total_training_steps
        from stages.train.rewards import RewardFunction
        from stages.train.sync_format import remove_sync_root, sync_root

        cfg = self.cfg
        if resolve_device(cfg.trainer.device) != "cpu":
            raise StageError("fleet training runs its actor on CPU so far (trainer.device resolved to a GPU); set "
                             "trainer.device=cpu. The GPU path is issue #28's next slice.")
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_root = self.out / "checkpoints"
        steps_done = checkpoint.all_steps(self.ckpt_root)
        if steps_done and not self.resume_wanted:
            raise StageError(f"{self.ckpt_root} holds checkpoints of an earlier fleet run (steps {steps_done}). Pass "
                             "--resume to continue it, --force to start over (removing them), or another --out-dir.")
        if self.resume_wanted and not steps_done:
            raise StageError(f"--resume: {self.ckpt_root} holds no checkpoint to resume from. Run without --resume "
                             "to start, with trainer.save_freq > 0 so that checkpoints are written.")
        self.resume = checkpoint.step_dir(self.ckpt_root, steps_done[-1]) if steps_done else None
        state = checkpoint.read_trainer_state(self.resume) if self.resume else {}
        self.global_step = int(state.get("global_step", 0))
        self.batching.load_state_dict(state.get("rollout_batching") or {})

        # Each member's data and reward first: a member whose file is missing or bad fails here, alone.
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        steps = []
        for member in self.members:
            mcfg = member.spec.cfg
            try:
                data = PromptDataset(mcfg.data.train_files, self.tokenizer, mcfg.data)
                member.train_iter = BatchIterator(data.items, mcfg.data.train_batch_size, mcfg.data.shuffle,
                                                  mcfg.data.seed)
                member.reward_fn = RewardFunction(mcfg)
                member.val_items = PromptDataset(mcfg.data.val_files, self.tokenizer, mcfg.data,
                                                 max_samples=mcfg.data.val_max_samples).items
                steps.append(total_training_steps(mcfg, len(member.train_iter)))
            except Exception as exc:
                self._fail(member, exc)
        self.total_steps = max(steps) if steps else 0
        for name, saved in state.get("members", {}).items():
            member = next((m for m in self.members if m.name == name), None)
            if member is None:
                continue
            member.val_before = saved.get("val_before")
            if saved["status"] == "failed" and member.status == "running":
                member.status, member.error = "failed", saved["error"]
            elif member.train_iter is not None and saved.get("data"):
                member.train_iter.load_state_dict(saved["data"])
        if not self.live():
            return

        n_members = len(self.members)
        bundles = [{"CPU": 1}, {"CPU": 1}]
        if init_ray(cfg, bundles):
            stack.callback(ray.shutdown)
        self.sync_dir = sync_root(f"fleet-{os.getpid()}-{int(time.time())}")
        stack.callback(remove_sync_root, self.sync_dir)

        from stages.train.fleet.engine import FleetEngine
        from stages.train.fleet.worker import FleetWorker

        rollout = cfg.actor_rollout_ref.rollout
        max_len = rollout.max_model_len or (cfg.data.max_prompt_length + (rollout.response_length or cfg.data.max_response_length))
        env = {**worker_log_env(), "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process core: seeded rollouts repeat (see recipe.py)
               # every member keeps its merged weights between its generate calls (see fleet/engine.py)
               "LORA_PIPELINE_CPU_LORA_MERGED_SLOTS": str(n_members)}
        max_rank = max(m.member.lora_rank for m in self.fleet.members)
        self.engine = ray.remote(FleetEngine).options(num_cpus=1, runtime_env={"env_vars": env}).remote(
            self.model_dir, rollout.model_dump(), lora_rank=max_rank, max_model_len=max_len,
            seed=rollout.seed + self.global_step, members=n_members)
        stack.callback(lambda: ray.kill(self.engine))
        stack.callback(lambda: ray.get(self.engine.shutdown.remote(), timeout=60))
        members = [{**m.member.__dict__, "betas": list(m.member.betas)} for m in self.fleet.members]
        self.worker = ray.remote(FleetWorker).options(num_cpus=1, runtime_env={"env_vars": worker_log_env()}).remote(
            cfg.to_dict(), self.model_dir, members, self.start_folders, os.cpu_count() or 1)
        stack.callback(lambda: ray.kill(self.worker))
        ray.get([self.worker.setup.remote(), self.engine.__ray_ready__.remote()])
        if self.resume:
            ray.get(self.worker.load_state.remote(str(self.resume)))
            console_log("fleet resumed from %s (step %d)", self.resume, self.global_step)
        self._sync(list(range(n_members)))
        if not self.resume and cfg.trainer.val_before_train:  # fresh adapters: B = 0, the base's reward
            self._validate("val_before")
        from stages.train.fleet.tracking import FleetTracking

        saved = checkpoint.read_trainer_state(self.resume).get("mlflow") if self.resume else None
        self.tracking = FleetTracking(cfg, self.fleet.members, self.parent_run_id, saved, str(self.out))
        stack.callback(self.tracking.close, "FAILED")  # a no-op when _write_outcome has closed it

    def _validate(self, when: str) -> None:
        """Each running member's held-out reward, kept as its val_before or val_after; a raising reward fails it."""
        from stages.train.fleet.validation import validate_member

        for index in self.live():
            member = self.members[index]
            try:
                setattr(member, when, validate_member(self.engine, self.tokenizer, member))
            except Exception as exc:
                self._fail(member, exc)

    def _sync(self, indices: list[int]) -> None:
        import ray

        folders = ray.get(self.worker.write_adapters.remote(str(self.sync_dir), indices))
        ray.get([self.engine.update_member.remote(self.members[i].name, folders[i]) for i in indices])

    # ---------------------------------------------------------------------------------------------- loop
    def step(self) -> dict:
        import ray
        import torch

        from stages.train.batch import build_tensors, outcome_rewards
        from stages.train.core_algos import get_adv_estimator, resolve_adv_estimator_name

        from stages.train.fleet import rollout as fleet_rollout
        from stages.train.fleet.update_loop import on_policy

        t0 = time.perf_counter()
        live = self.live()
        batches = {index: self.members[index].train_iter.next_batch() for index in live}
        way = self.batching.next_way(len(live))
        outputs = fleet_rollout.generate(
            self.engine, [fleet_rollout.sampling_call(self.members[i], batches[i]) for i in live], way)
        t_gen = time.perf_counter() - t0
        tokens = sum(len(s["token_ids"]) for out in outputs for samples in out for s in samples)
        self.batching.record(way, t_gen, tokens, len(live))
        per_member: dict[int, dict] = {}
        for index, out in zip(live, outputs):
            try:
                per_member[index] = fleet_rollout.score_rows(self.tokenizer, self.members[index], batches[index], out)
            except Exception as exc:
                self._fail(self.members[index], exc)
        metrics: dict = {}
        if not per_member:
            return metrics
        prompts, responses, owner = [], [], []
        for index, rows in per_member.items():
            prompts += rows["prompts"]
            responses += rows["responses"]
            owner += [index] * len(rows["prompts"])
        batch = build_tensors(prompts, responses, self.pad_id)
        member_of_row = torch.tensor(owner, dtype=torch.long)
        mask = batch["response_mask"]
        advantages = torch.zeros_like(mask)
        adv_fn = get_adv_estimator(resolve_adv_estimator_name(self.cfg.algorithm.adv_estimator))
        for index, rows in per_member.items():
            sel = (member_of_row == index).nonzero().squeeze(-1)
            algo = self.members[index].spec.cfg.algorithm
            adv, _ = adv_fn(outcome_rewards(rows["scores"], mask[sel]), mask[sel], rows["index"], algo)
            advantages[sel] = adv.float()
        batch["advantages"] = advantages
        t1 = time.perf_counter()
        if not on_policy(self.cfg):  # else the update's own forward gives the old log-probs (update_loop.on_policy)
            batch["old_log_probs"] = ray.get(self.worker.log_probs.remote(batch, member_of_row))
        update = ray.get(self.worker.update.remote(batch, member_of_row))
        t_update = time.perf_counter() - t1
        t2 = time.perf_counter()
        self._sync(list(per_member))
        t_sync = time.perf_counter() - t2
        for index, rows in per_member.items():
            name = self.members[index].name
            own = {"reward/mean": _mean(rows["scores"]), "rows": float(len(rows["scores"]))}
            if rows["accs"]:
                own["reward/acc"] = _mean(rows["accs"])
            prefix = f"fleet/{name}/"  # the update's figures of this member: pg_loss, kl_loss, entropy, lr, ...
            own.update({f"actor/{k[len(prefix):]}": v for k, v in update.items() if k.startswith(prefix)})
            self.members[index].last = own
            metrics.update({f"members/{name}/{k}": v for k, v in own.items()})
        metrics.update({"timing/generate": t_gen, "timing/generate_mixed": float(way == "mixed"),
                        "timing/update": t_update, "timing/sync": t_sync,
                        "timing/step": time.perf_counter() - t0, "members/live": float(len(per_member))})
        return metrics

    def _fit(self) -> None:
        history_path = self.out / "history.jsonl"
        if self.resume and history_path.is_file():
            kept = [json.loads(x) for x in history_path.read_text().splitlines() if x.strip()]
            self.history = [e for e in kept if e.get("step", 0) <= self.global_step]
        else:
            self.history = []
        history_path.write_text("".join(json.dumps(e) + "\n" for e in self.history))

        def record(entry: dict) -> None:
            self.history.append(entry)
            with open(history_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            if self.tracking is not None:  # None only when no member got past reading its data
                self.tracking.log_entry(entry)

        # the held-out reward before training, at step 0 of each member's run (MLflow only: history keeps its format)
        if not self.resume and self.tracking is not None:
            self.tracking.log_entry({"step": self.global_step, **{
                f"members/{m.name}/{k}": v for m in self.members if m.val_before for k, v in m.val_before.items()}})
        save_freq = self.cfg.trainer.save_freq
        while self.global_step < self.total_steps and self.live():
            metrics = self.step()
            self.global_step += 1
            record({"step": self.global_step, **metrics})
            console_log("fleet step %d/%d: %s", self.global_step, self.total_steps,
                        " ".join(f"{m.name}={m.last.get('reward/mean', float('nan')):.3f}"
                                 for m in self.members if m.status == "running"))
            last = self.global_step == self.total_steps
            test_freq = self.cfg.trainer.test_freq
            if last or (test_freq > 0 and self.global_step % test_freq == 0):
                self._validate("val_after")
                record({"step": self.global_step, **{f"members/{m.name}/{k}": v for m in self.members
                                                     if m.status == "running" and m.val_after
                                                     for k, v in m.val_after.items()}})
            if save_freq > 0 and (self.global_step % save_freq == 0 or last):
                self._save_checkpoint()

    def _save_checkpoint(self) -> None:
        import ray

        from stages.train import checkpoint

        tmp = checkpoint.begin(self.ckpt_root, self.global_step)
        ray.get(self.worker.save_state.remote(str(tmp)))
        state = {"global_step": self.global_step, "mlflow": self.tracking.state(),
                 "rollout_batching": self.batching.state_dict(),
                 "members": {m.name: {"status": m.status, "error": m.error, "val_before": m.val_before,
                                      "data": m.train_iter.state_dict() if m.train_iter is not None else None}
                             for m in self.members}}
        checkpoint.commit(self.ckpt_root, self.global_step, state, keep_last=self.cfg.trainer.max_actor_ckpt_to_keep)

    # -------------------------------------------------------------------------------------------- finish
    def _finish(self) -> dict:
        import ray

        done = self.live()
        folders = {}
        if done:
            root = self.out / "members"
            written = ray.get(self.worker.write_adapters.remote(str(root / ".adapters"), done))
            for index, folder in written.items():  # <out>/members/<name>/adapter
                final = root / self.members[index].name / "adapter"
                final.parent.mkdir(parents=True, exist_ok=True)
                if final.exists():  # a resumed run replaces what an earlier finish wrote
                    shutil.rmtree(final)
                os.replace(folder, final)
                folders[index] = str(final)
                self.tracking.log_member_artifacts(self.members[index].name, str(final))
                self.members[index].status = "finished"
            (root / ".adapters").rmdir()
        return self._write_outcome(folders=folders)

    def _write_outcome(self, folders: dict | None = None, stopped: bool = False) -> dict:
        folders = folders or {}
        tracking = self.tracking
        outcome = {
            "steps": self.global_step,
            "stopped_by_fail_fast": stopped,
            "members": {
                m.name: {"status": "stopped" if stopped and m.status == "running" else m.status, "error": m.error,
                         "adapter_dir": folders.get(i), "metrics": m.last,
                         "val_reward_before": (m.val_before or {}).get("val/reward"),
                         "val_reward_after": (m.val_after or {}).get("val/reward"),
                         "val_acc_before": (m.val_before or {}).get("val/acc"),
                         "val_acc_after": (m.val_after or {}).get("val/acc"),
                         "start_adapter": m.spec.start_adapter,
                         "mlflow_run_id": tracking.member_runs.get(m.name) if tracking else None}
                for i, m in enumerate(self.members)},
            "history_path": str(self.out / "history.jsonl"),
            "mlflow_run_id": tracking.run_id if tracking else None,
            "loggers": tracking.destinations if tracking else {},
        }
        if tracking is not None:  # each member's run ends with its own outcome, then the fleet's
            for name, member in outcome["members"].items():
                tracking.end_member(name, member["status"], member["error"])
            tracking.close("FAILED" if stopped else "FINISHED")  # --fail-fast stopped it
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / OUTCOME_FILE).write_text(json.dumps(outcome, indent=2))
        return outcome
