"""Stage 2: train a LoRA adapter with RL (the equivalent of verl's main_ppo with LoRA).

`train(cfg, model_dir, base_fingerprint)` runs the recipe in `stages.train.recipe` (setup / fit / finish, with
one ExitStack for teardown) and returns the outputs the later stages read. Heavy imports (torch, ray, vllm,
mlflow) stay inside the functions so that importing this package (e.g. for `pipeline --help`) is cheap.
"""

from __future__ import annotations

from stages.train.recipe import TrainRecipe, init_ray, resolve_device, total_training_steps

__all__ = ["TrainRecipe", "init_ray", "resolve_device", "total_training_steps", "train"]


def train(cfg, model_dir: str, base_fingerprint: str | None = None, out_dir: str | None = None,
          parent_run_id: str | None = None, replace_outputs: bool = False) -> dict:
    """Train; returns the outputs for the next stages (see `TrainRecipe.finish`).

    A run that does not resume refuses an out folder or checkpoint folder holding an earlier run's files
    unless `replace_outputs` (`pipeline train --force`; the pipeline passes it for its own run directory)."""
    with TrainRecipe(cfg, model_dir, base_fingerprint, out_dir, parent_run_id, replace_outputs) as recipe:
        recipe.setup()
        recipe.fit()
        return recipe.finish()
