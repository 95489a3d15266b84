"""The RL loop: generate with vLLM, score, estimate advantages, update the LoRA actor on FSDP2, sync, repeat.

One step, top to bottom (`Trainer.step`):
    prompts -> vLLM (n responses each) -> rewards (+ DAPO overlong shaping, dynamic sampling)
    -> values (PPO critic) -> old log-probs (skipped when on-policy, see below) -> reference log-probs (only with
       a KL term) -> advantages (the registered estimator) -> critic update -> actor update
    -> gather the LoRA tensors (or merged weights) from the FSDP shards -> the engine reloads them in place.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from pathlib import Path

import torch

from ground.logs import console_log
from stages.train import checkpoint, dumps
from stages.train.batch import (
    Rollout, build_tensors, flatten_agent_outputs, flatten_generation, outcome_rewards, padded_log_probs,
)
from stages.train.sync_guard import SyncGuard

log = logging.getLogger(__name__)


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else 0.0


class Trainer:
    """Built by `stages.train.train` (setup lives there); `fit()` runs the loop from `start_step`."""

    def __init__(self, cfg, *, workers, engine, tokenizer, train_iter, val_items, reward_fn, tracking, sync_mode,
                 sync_dir: Path, out_dir: Path, total_steps: int, start_step: int = 0, history: list | None = None):
        from stages.train.core_algos import (
            get_adv_estimator, make_kl_controller, needs_critic, needs_greedy_baseline, resolve_adv_estimator_name,
        )

        self.cfg, self.workers, self.engine, self.tokenizer = cfg, workers, engine, tokenizer
        self.train_iter, self.val_items, self.reward_fn, self.tracking = train_iter, val_items, reward_fn, tracking
        self.sync_mode, self.sync_dir, self.out_dir = sync_mode, sync_dir, out_dir
        self.total_steps, self.global_step = total_steps, start_step
        self.history = history or []
        estimator = resolve_adv_estimator_name(cfg.algorithm.adv_estimator)
        self.adv_fn = get_adv_estimator(estimator)
        self.use_critic = needs_critic(estimator)
        self.greedy_baseline = needs_greedy_baseline(estimator)
        self.kl_ctrl = make_kl_controller(cfg.algorithm.kl_ctrl)
        actor = cfg.actor_rollout_ref.actor
        self.use_ref = actor.use_kl_loss or cfg.algorithm.use_kl_in_reward
        self.num_mini_batches = math.ceil(cfg.data.train_batch_size / actor.ppo_mini_batch_size)
        # On-policy shortcut: with one PPO epoch over one mini-batch the weights do not move before each micro-batch
        # is evaluated, so the old log-probs equal the update's own forward (detached). This saves a full forward
        # pass per step. A KL penalty in the reward needs them before the update, so it turns the shortcut off.
        # In rollout correction's bypass mode the engine's log-probs are the old ones: no pass, no shortcut.
        self.bypass_old_log_probs = cfg.algorithm.rollout_correction.bypass_mode
        self.reuse_forward_as_old = (actor.ppo_epochs == 1 and self.num_mini_batches == 1
                                     and not cfg.algorithm.use_kl_in_reward and not self.bypass_old_log_probs)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.sync_guard = SyncGuard(cfg.trainer.sync_check_freq, self._engine_scores, self._actor_scores)
        self.history_path = out_dir / "history.jsonl"
        self.val_generations: list[dict] = []  # the last validation's table (trainer.log_val_generations)
        from stages.train import agent_loops
        from stages.train.tools import load_tools

        # Multi-turn rollouts (agent loops, tools); with none of them configured every batch takes the plain path.
        self.default_agent = agent_loops.default_agent_name(cfg)
        self.tools = load_tools(cfg.actor_rollout_ref.rollout.multi_turn.tool_config_path)
        agent_loops.check_items(getattr(train_iter, "dataset", []), self.default_agent, "data.train_files")
        agent_loops.check_items(val_items, self.default_agent, "data.val_files")

    # --------------------------------------------------------------------------------------------- rollout
    def _call_engine(self, method: str, *args, **kwargs):
        import ray

        return ray.get(getattr(self.engine, method).remote(*args, **kwargs))

    def _engine_scores(self, prompt: list[int], response: list[int]) -> list[float]:
        return self._call_engine("score", prompt, response)

    def _actor_scores(self, prompt: list[int], response: list[int]) -> list[float]:
        probe = build_tensors([prompt], [response], self.pad_id)
        return self.workers.compute_log_probs(probe, "policy")["log_probs"][0, : len(response)].tolist()

    def _generate(self, items: list[dict], greedy: bool = False, n: int | None = None, **sampling) -> list:
        rollout = self.cfg.actor_rollout_ref.rollout
        params = dict(n=n or rollout.n, max_tokens=rollout.response_length or self.cfg.data.max_response_length,
                      temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k, greedy=greedy)
        params.update(sampling)
        return self._call_engine("generate", [it["prompt_ids"] for it in items], **params)

    def _rollout(self, items: list[dict], greedy: bool = False, n: int | None = None, **sampling) -> Rollout:
        """n responses per item: one engine call (single-turn rows), or each row's agent loop (multi-turn)."""
        from stages.train import agent_loops

        if not agent_loops.uses_agent_loops(self.cfg, items):
            return flatten_generation(items, self._generate(items, greedy=greedy, n=n, **sampling))
        rollout = self.cfg.actor_rollout_ref.rollout

        def generate_many(prompts: list[list[int]], budgets: list[int]) -> list[dict]:
            params = dict(n=1, max_tokens=budgets, temperature=rollout.temperature, top_p=rollout.top_p,
                          top_k=rollout.top_k, greedy=greedy)
            params.update(sampling)
            params["n"] = 1  # each sample is its own conversation
            return [outs[0] for outs in self._call_engine("generate", prompts, **params)]

        response_length = rollout.response_length or self.cfg.data.max_response_length
        max_model_len = rollout.max_model_len or (self.cfg.data.max_prompt_length + response_length)
        outputs = agent_loops.run_agent_loops(items, n or rollout.n, cfg=self.cfg, tokenizer=self.tokenizer,
                                              tools=self.tools, generate_many=generate_many,
                                              response_length=response_length, max_model_len=max_model_len)
        return flatten_agent_outputs(items, outputs)

    def _score(self, r: Rollout) -> None:
        # the model's own tokens: a tool's output (a calculator's result) must not earn the reward
        texts = self.tokenizer.batch_decode(r.model_token_ids(), skip_special_tokens=True)
        extra_infos = [it["extra_info"] for it in r.items]
        if r.agent_stats:  # verl's keys: the turn count and each tool's final calc_reward, per sample
            extra_infos = [{**(info or {}), "num_turns": s["num_turns"], "rollout_reward_scores": s["tool_rewards"]}
                           for info, s in zip(extra_infos, r.agent_stats)]
        results = self.reward_fn([it["data_source"] for it in r.items], texts,
                                 [it["ground_truth"] for it in r.items], extra_infos)
        r.scores = [float(x["score"]) for x in results]
        r.accs = [x.get("acc") for x in results]
        if self.cfg.reward_model.overlong_buffer.enable:
            r.scores = [s + float(p) for s, p in zip(r.scores, self._overlong_penalty(r))]

    def _overlong_penalty(self, r: Rollout) -> torch.Tensor:
        """DAPO's overlong shaping term of each response [B] (0 or negative)."""
        from stages.train.core_algos import overlong_penalty

        shaping = self.cfg.reward_model.overlong_buffer
        max_len = self.cfg.actor_rollout_ref.rollout.response_length or self.cfg.data.max_response_length
        return overlong_penalty([len(x) for x in r.response_ids], max_len, shaping.len, shaping.penalty_factor)

    def _overlong_metrics(self, r: Rollout, prefix: str) -> dict:
        """With overlong_buffer.log (as verl's DAPO reward manager): the mean shaping term, and the share of
        responses it penalised."""
        shaping = self.cfg.reward_model.overlong_buffer
        if not (shaping.enable and shaping.log) or len(r) == 0:
            return {}
        penalty = self._overlong_penalty(r)
        return {f"{prefix}overlong_reward": float(penalty.mean()), f"{prefix}overlong": float((penalty < 0).float().mean())}

    def _rollout_batch(self, metrics: dict) -> Rollout:
        """One batch of train_batch_size prompts x n responses; with DAPO's dynamic sampling, generation
        batches are drawn until that many groups with differing rewards are collected (or the limit is hit)."""
        fg = self.cfg.algorithm.filter_groups
        want = self.cfg.data.train_batch_size
        collected = Rollout([], [], [], [])
        gen_batches = 0
        while True:
            items = self.train_iter.next_batch()
            r = self._rollout(items)
            self._score(r)
            gen_batches += 1
            if not fg.enable:
                collected = r
                break
            from stages.train.core_algos import dynamic_sampling_keep

            values = r.accs if fg.metric == "acc" and all(a is not None for a in r.accs) else r.scores
            keep = dynamic_sampling_keep(r.index, values).tolist()
            collected.extend(r.select([i for i, k in enumerate(keep) if k]))
            groups = list(dict.fromkeys(collected.index))
            if len(groups) >= want or gen_batches >= fg.max_num_gen_batches:
                chosen = set(groups[:want])
                collected = collected.select([i for i, g in enumerate(collected.index) if g in chosen])
                break
        metrics["rollout/gen_batches"] = gen_batches
        return collected

    # ------------------------------------------------------------------------------------------------ step
    def step(self) -> dict:
        from stages.train.core_algos import apply_kl_penalty, masked_mean

        metrics, timing = {}, {}
        t_step = time.perf_counter()

        t0 = time.perf_counter()
        r = self._rollout_batch(metrics)
        timing["generate"] = time.perf_counter() - t0
        if len(r) == 0:  # dynamic sampling found no informative group: nothing to learn from this step
            log.warning("step %d: every sampled group had equal rewards; skipping the update", self.global_step + 1)
            return {"step_skipped": 1.0}
        metrics.update(self._overlong_metrics(r, "reward/"))
        if self.cfg.trainer.rollout_data_dir:
            dumps.dump_generations(self.cfg.trainer.rollout_data_dir, self.global_step + 1,
                                   dumps.generation_rows(self.tokenizer, r, self.global_step + 1))
        batch = build_tensors(r.prompt_ids, r.response_ids, self.pad_id, r.response_masks or None)
        mask = batch["response_mask"]
        scores = outcome_rewards(r.scores, mask, r.turn_rewards)
        if self.cfg.actor_rollout_ref.rollout.calculate_log_probs and len(r.log_probs) == len(r):
            # the update compares them with the actor's (rollout_corr/ metrics) and corrects when configured
            batch["rollout_log_probs"] = padded_log_probs(r.log_probs, mask.shape[1])

        reward_baselines = None
        if self.greedy_baseline:  # ReMax: the greedy response's reward is each prompt's baseline
            firsts = list({it["uid"]: it for it in r.items}.values())
            g = self._rollout(firsts, greedy=True, n=1)
            self._score(g)
            base = dict(zip(g.index, g.scores))
            reward_baselines = torch.tensor([base[i] for i in r.index])

        self.sync_guard.before(self.global_step + 1, r.prompt_ids, r.response_ids)  # before the engine sleeps
        self._call_engine("sleep")  # CUDA: the actor's passes get the engine's GPU memory (a no-op on CPU)
        if self.use_critic:
            t0 = time.perf_counter()
            batch["values"] = self.workers.compute_values(batch)
            timing["values"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if self.bypass_old_log_probs:
            batch["old_log_probs"] = batch["rollout_log_probs"].clone()
        elif not self.reuse_forward_as_old:
            batch["old_log_probs"] = self.workers.compute_log_probs(batch, "policy")["log_probs"]
        timing["old_log_prob"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if self.use_ref:
            batch["ref_log_probs"] = self.workers.compute_log_probs(batch, "ref")["log_probs"]
            if "old_log_probs" in batch:
                metrics["actor/kl_ref"] = masked_mean(batch["old_log_probs"] - batch["ref_log_probs"], mask).item()
        timing["reference"] = time.perf_counter() - t0

        rewards = scores
        if self.cfg.algorithm.use_kl_in_reward:
            rewards, kl_metrics = apply_kl_penalty(scores, batch["old_log_probs"], batch["ref_log_probs"], mask,
                                                   self.kl_ctrl, self.cfg.algorithm.kl_penalty)
            metrics.update(kl_metrics)
        advantages, returns = self.adv_fn(rewards, mask, r.index, self.cfg.algorithm, values=batch.get("values"),
                                          reward_baselines=reward_baselines)
        batch["advantages"], batch["returns"] = advantages.float(), returns.float()

        t0 = time.perf_counter()
        if self.use_critic:
            metrics.update(self.workers.update_critic(batch, self.num_mini_batches))
        if self.global_step + 1 > self.cfg.trainer.critic_warmup:
            if "old_log_probs" not in batch:
                batch["old_log_probs"] = torch.zeros_like(mask)  # unused: the update reuses its own forward
            metrics.update(self.workers.update_actor(batch, self.num_mini_batches, self.reuse_forward_as_old))
        timing["update"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        sync = self.sync()
        timing["sync"] = time.perf_counter() - t0
        metrics.update(self.sync_guard.after(self.global_step + 1))  # raises when the engine kept old weights

        timing["step"] = time.perf_counter() - t_step
        lengths = mask.sum(-1)
        n_tokens = int(lengths.sum().item())
        accs = [a for a in r.accs if a is not None]
        metrics.update({
            "reward/mean": _mean(r.scores),
            "reward/std": statistics.pstdev(r.scores) if len(r.scores) > 1 else 0.0,
            "response_length/mean": lengths.mean().item(),
            "response_length/clip_ratio": _mean(f == "length" for f in r.finish_reasons),
            "sync/bytes": sync["bytes"],
            "sync/gather_write_s": sync["gather_write_s"],
            "sync/load_s": sync["load_s"],
            "perf/generate_tokens_per_s": n_tokens / max(timing["generate"], 1e-9),
            "perf/tokens_per_s": (n_tokens + int(batch["attention_mask"].sum())) / max(timing["step"], 1e-9),
            **({"reward/acc": _mean(accs)} if accs else {}),
            **agent_metrics(r, "multi_turn/"),
            **{f"timing/{k}": v for k, v in timing.items()},
        })
        return metrics

    def sync(self) -> dict:
        """Gather the actor's weights from the FSDP shards and load them into the engine in place."""
        layered = self.cfg.actor_rollout_ref.rollout.layered_summon
        target = self.sync_dir / self.sync_mode
        wrote = self.workers.sync_weights(str(target), self.sync_mode, layered)
        t0 = time.perf_counter()
        self._call_engine("wake_up")
        self._call_engine("update_adapter" if self.sync_mode == "adapter" else "update_merged", str(target))
        return {"bytes": wrote["bytes"], "gather_write_s": wrote["seconds"], "load_s": time.perf_counter() - t0}

    # ------------------------------------------------------------------------------------------ validation
    def validate(self) -> dict:
        """The held-out prompts, data.val_batch_size at a time (None: all in one call), sampled as
        rollout.val_kwargs says; their mean reward (and accuracy when the scorer gives one)."""
        vk = self.cfg.actor_rollout_ref.rollout.val_kwargs
        t0 = time.perf_counter()
        if vk.do_sample:
            sampling = dict(n=vk.n, temperature=vk.temperature, top_p=vk.top_p, top_k=vk.top_k)
        else:
            sampling = dict(greedy=True, n=1, temperature=0.0, top_p=1.0, top_k=-1)
        size = self.cfg.data.val_batch_size or max(len(self.val_items), 1)
        r = Rollout([], [], [], [])
        for start in range(0, len(self.val_items), size):
            r.extend(self._rollout(self.val_items[start : start + size], **sampling))
        self._score(r)
        log.info("validation sample: %r -> %r", self.tokenizer.decode(r.prompt_ids[0][-12:]),
                 self.tokenizer.decode(r.response_ids[0]))
        out = {"val/reward": _mean(r.scores), "val/seconds": time.perf_counter() - t0,
               "val/response_length": _mean(len(x) for x in r.model_token_ids())}  # model tokens only
        accs = [a for a in r.accs if a is not None]
        if accs:
            out["val/acc"] = _mean(accs)
        out.update(self._overlong_metrics(r, "val/"))
        out.update(agent_metrics(r, "val/multi_turn/"))
        t = self.cfg.trainer
        if t.validation_data_dir or t.log_val_generations:
            rows = dumps.generation_rows(self.tokenizer, r, self.global_step)
            if t.validation_data_dir:
                dumps.dump_generations(t.validation_data_dir, self.global_step, rows)
            if t.log_val_generations:
                self.val_generations = dumps.pick_table(rows, t.log_val_generations)
                self.tracking.log_table(self.val_generations, f"val_generations/step_{self.global_step}.json",
                                        step=self.global_step)
        return out

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, extra_state: dict) -> Path:
        root = self.cfg.trainer.default_local_dir
        tmp = checkpoint.begin(root, self.global_step)
        self.workers.save_state(str(tmp))
        state = {"global_step": self.global_step, "data": self.train_iter.state_dict(), "kl_coef": self.kl_ctrl.value,
                 "mlflow_run_id": self.tracking.run_id, **extra_state}
        return checkpoint.commit(root, self.global_step, state, keep_last=self.cfg.trainer.max_actor_ckpt_to_keep)

    # -------------------------------------------------------------------------------------------------- loop
    def record(self, entry: dict) -> None:
        self.history.append(entry)
        with open(self.history_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        metrics = {k: v for k, v in entry.items() if k != "step"}
        self.tracking.log_metrics(metrics, step=entry["step"])

    def fit(self, extra_state: dict) -> dict:
        """Run steps global_step+1 .. total_steps with validation and checkpoints; returns the last validation."""
        from tqdm import tqdm

        t = self.cfg.trainer
        last_val = None
        bar = tqdm(total=self.total_steps, initial=self.global_step, desc="train", unit="step", dynamic_ncols=True)
        try:
            while self.global_step < self.total_steps:
                metrics = self.step()
                self.global_step += 1
                metrics["training/epoch"] = self.train_iter.epoch
                self.record({"step": self.global_step, **metrics})
                bar.update(1)
                bar.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.3f}",
                                s_step=f"{metrics.get('timing/step', float('nan')):.1f}")
                log.info("step %d/%d %s", self.global_step, self.total_steps, brief_metrics(metrics))
                last = self.global_step == self.total_steps
                if t.test_freq > 0 and (self.global_step % t.test_freq == 0 or last):
                    last_val = self.validate()
                    self.record({"step": self.global_step, **last_val})
                    console_log("validation at step %d: %s", self.global_step, brief_metrics(last_val))
                if t.save_freq > 0 and (self.global_step % t.save_freq == 0 or last):
                    self.save_checkpoint(extra_state)
        finally:
            bar.close()
        return last_val


def agent_metrics(r: Rollout, prefix: str) -> dict:
    """Multi-turn rollouts: turns, tool calls and tool errors per sample, and the share of samples that called a
    tool (nothing on the single-turn path)."""
    if not r.agent_stats:
        return {}
    stats = r.agent_stats
    return {f"{prefix}num_turns": _mean(s["num_turns"] for s in stats),
            f"{prefix}tool_calls": _mean(s["tool_calls"] for s in stats),
            f"{prefix}tool_errors": _mean(s["tool_errors"] for s in stats),
            f"{prefix}tool_call_rate": _mean(s["tool_calls"] > 0 for s in stats)}


def brief_metrics(metrics: dict) -> str:
    """The few metrics a person follows, as `key=value` pairs."""
    keys = ("reward/mean", "reward/acc", "val/reward", "val/acc", "actor/entropy", "actor/grad_norm",
            "response_length/mean", "timing/step")
    return " ".join(f"{k}={metrics[k]:.3g}" for k in keys if k in metrics)
