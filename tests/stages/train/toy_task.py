"""A toy RL task the tiny random model learns in a few steps, shared by the training tests.

Prompts are the arithmetic questions; the reward is the share of digit characters in the response (dense and
graded, so GRPO groups have different rewards from the first step). The tiny model starts near uniform over
its 384 tokens, so its greedy response scores about 0.02; a LoRA that includes lm_head can move the digit
tokens' logits directly and learns within ~10 steps at a high learning rate.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

REWARD_SOURCE = '''
def compute_score(data_source, solution_str, ground_truth, extra_info):
    text = solution_str
    share = sum(ch.isdigit() for ch in text) / max(len(text), 1)
    return {"score": share, "acc": float(text.strip()[:1].isdigit())}
'''


def make_toy_task(root: Path) -> tuple[Path, Path]:
    """Write the data (64 train, 8 val prompts) and the reward file under root; returns (data_dir, reward_py)."""
    from stages.train.arithmetic import make_arithmetic

    data = root / "toy-data"
    if not (data / "train.parquet").is_file():
        make_arithmetic(data, n_train=64, n_test=8, seed=0)
    reward = root / "digits_reward.py"
    reward.write_text(REWARD_SOURCE)
    return data, reward


def toy_overrides(model_dir: Path, root: Path, steps: int, extra: dict | None = None) -> list[str]:
    """Overrides for a small, fast run on the tiny model (2 FSDP workers over gloo, merged sync)."""
    data, reward = make_toy_task(root)
    base = {
        "actor_rollout_ref.model.path": str(model_dir),
        "actor_rollout_ref.model.lora_rank": 8,
        "actor_rollout_ref.model.lora_alpha": 16,
        "actor_rollout_ref.model.target_modules": "[q_proj,v_proj,lm_head]",
        "actor_rollout_ref.actor.optim.lr": 5e-2,
        "actor_rollout_ref.actor.ppo_mini_batch_size": 4,
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 8,
        "actor_rollout_ref.rollout.n": 4,
        "actor_rollout_ref.rollout.gpu_memory_utilization": 0.1,
        "actor_rollout_ref.rollout.max_num_seqs": 32,
        "actor_rollout_ref.rollout.dtype": "float32",
        "actor_rollout_ref.rollout.lora_sync": "merged",
        "actor_rollout_ref.rollout.val_kwargs.do_sample": False,  # greedy validation (the demo config samples)
        "data.train_files": str(data / "train.parquet"),
        "data.val_files": str(data / "test.parquet"),
        "data.train_batch_size": 4,
        "data.max_prompt_length": 64,
        "data.max_response_length": 8,
        "custom_reward_function.path": str(reward),
        "trainer.cpu_workers": 2,
        "trainer.total_training_steps": steps,
        "trainer.test_freq": -1,
        "trainer.save_freq": -1,
        "trainer.seed": 1,
        "trainer.logger": "[console,mlflow]",
        "trainer.project_name": "tests",
        "trainer.experiment_name": "toy",
    }
    base.update(extra or {})
    return [f"{k}={v}" for k, v in base.items()]


@contextmanager
def frozen_worker(model_dir: Path, root: Path, extra: dict | None = None, with_critic: bool = False):
    """One in-process ActorWorker (world size 1 over gloo, one thread) on the tiny model whose weights never
    move (lr 0, no weight decay, no clipping), so every pass the tests compare sees the same model; with_critic
    adds the PPO critic (adapter + value head), frozen the same way."""
    from config import load_config
    from stages.train.actor_worker import ActorWorker
    from ground.ports import free_port

    cfg = load_config(None, toy_overrides(model_dir, root, steps=1, extra={
        "actor_rollout_ref.actor.optim.lr": 0.0,
        "actor_rollout_ref.actor.optim.weight_decay": 0.0,
        "actor_rollout_ref.actor.grad_clip": 1e9,
        "critic.optim.lr": 0.0,
        "critic.optim.weight_decay": 0.0,
        "critic.grad_clip": 1e9,
        "trainer.cpu_workers": 1,
        **(extra or {}),
    }))
    worker = ActorWorker(0, 1, cfg.to_dict(), str(model_dir), with_critic, 1, "cpu", 1)
    worker.init_distributed("127.0.0.1", free_port())
    worker.setup()
    try:
        yield worker
    finally:
        worker.shutdown()


def ragged_batch(seed: int = 0, rows: int = 12, vocab: int = 300) -> dict:
    """Rows of very different prompt and response lengths (some responses empty), as the trainer builds them,
    with random advantages and old log-probs."""
    import random

    import torch

    from stages.train.batch import build_tensors

    rng = random.Random(seed)
    prompts = [[rng.randrange(5, vocab) for _ in range(rng.randint(3, 30))] for _ in range(rows)]
    responses = [[rng.randrange(5, vocab) for _ in range(rng.choice([0, 1, 2, 7, 16]))] for _ in range(rows)]
    batch = build_tensors(prompts, responses, pad_id=0)
    gen = torch.Generator().manual_seed(seed)
    r = batch["responses"].shape[1]
    batch["advantages"] = torch.randn((rows, r), generator=gen) * batch["response_mask"]
    batch["old_log_probs"] = -torch.rand((rows, r), generator=gen) * 3
    return batch
