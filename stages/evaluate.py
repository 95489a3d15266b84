"""Evaluate and gate: publish the adapter only if it beats its starting point on held-out data.

Both numbers come from the training stage's validation on `data.val_files`, run as `rollout.val_kwargs` says
(the demo samples 4 responses per question at temperature 1 and averages their rewards; `do_sample=False` is
greedy). The first pass runs before any update: on a fresh adapter the LoRA update is zero (PEFT initialises B
to 0), so it measures the base model; with `model.lora_adapter_path` it measures that adapter, and the outputs
say which (`start_point`). The last pass measures the trained adapter. The same engine, prompts and scorer
produce both, so the difference is the training's doing.
"""

from __future__ import annotations

from config import Config
from ground.errors import StageError


def evaluate(cfg: Config, train_outputs: dict) -> dict:
    base = train_outputs.get("val_reward_before")
    adapter = train_outputs.get("val_reward_after")
    if adapter is None or (base is None and not cfg.publish.force):
        raise StageError(
            "The publish gate compares the validation reward before and after training, but the training stage "
            f"recorded before={base} and after={adapter}. Keep trainer.val_before_train=True and data.val_files "
            "set, or set publish.force=True to publish without the comparison."
        )
    improvement = None if base is None else adapter - base
    threshold = cfg.publish.min_improvement
    if improvement is not None and improvement > threshold:
        publish, why = True, f"adapter beats its start by {improvement:+.3f} > publish.min_improvement={threshold}"
    elif cfg.publish.force:
        publish, why = True, f"forced (publish.force=True); improvement {improvement}"
    else:
        publish, why = False, (f"adapter does not beat its start: {improvement:+.3f} <= publish.min_improvement={threshold}; "
                               "set publish.force=True to publish anyway")
    start = train_outputs.get("start_adapter") or {}
    start_from = cfg.actor_rollout_ref.model.lora_adapter_path
    if start.get("ref") and start["ref"] != start_from:  # a registry reference: say which version it was
        start_from = f"{start_from} (= {start['ref']} in {start['registry']})"
    return {
        "start_point": f"adapter {start_from}" if start_from else "base model",
        "start_reward": base,
        "adapter_reward": adapter,
        "start_acc": train_outputs.get("val_acc_before"),
        "adapter_acc": train_outputs.get("val_acc_after"),
        "improvement": improvement,
        "min_improvement": threshold,
        "publish": publish,
        "decision": ("publish: " if publish else "skip: ") + why,
    }
