"""A five-member fleet on the tiny model for the fleet tests: three members on the toy task (digits reward,
different ranks, alphas, learning rates and rollout.n), one whose train file is missing, one whose
reward function raises."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.stages.train.toy_task import make_toy_task, toy_overrides

RAISING_REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info):
    raise ValueError("deliberately broken reward")
'''


def write_fleet(model_dir: Path, root: Path, steps: int) -> Path:
    """fleet.yaml under root: the toy run's shared settings (one actor rank) and the members add, sub, spell, nodata, broken."""
    from config.loader import overrides_to_dict

    data, reward = make_toy_task(root)
    broken = root / "broken_reward.py"
    broken.write_text(RAISING_REWARD)
    shared = overrides_to_dict(toy_overrides(model_dir, root, steps, extra={
        "trainer.cpu_workers": 1, "trainer.save_freq": 1, "trainer.logger": "[console]",
        "actor_rollout_ref.rollout.lora_sync": "adapter"}))
    for key in ("train_files", "val_files"):
        shared["data"].pop(key)
    shared.pop("custom_reward_function")
    files = {"train_files": str(data / "train.parquet"), "val_files": str(data / "test.parquet")}
    shared["fleet"] = {"members": [
        {"name": "add", "data": dict(files), "custom_reward_function": {"path": str(reward)}},
        {"name": "sub", "data": dict(files), "custom_reward_function": {"path": str(reward)}, "lora_rank": 4,
         "lora_alpha": 4, "optim": {"lr": 2e-2}, "rollout": {"n": 2}},
        {"name": "spell", "data": dict(files), "custom_reward_function": {"path": str(reward)}, "lora_rank": 2,
         "lora_alpha": 8},
        {"name": "nodata", "data": {"train_files": str(root / "missing.parquet"), "val_files": files["val_files"]},
         "custom_reward_function": {"path": str(reward)}},
        {"name": "broken", "data": dict(files), "custom_reward_function": {"path": str(broken)}},
    ]}
    path = root / "fleet.yaml"
    path.write_text(yaml.safe_dump(shared))
    return path
