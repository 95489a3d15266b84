"""Evaluate and gate: publish the adapter only if it beats the base model on held-out data.

Both numbers come from the training stage's greedy validation on `data.val_files`: before the first update
the LoRA update is zero (PEFT initialises B to 0), so that pass *is* the base model; after the last step it
is the adapter. The same engine, prompts and scorer produce both, so the difference is the adapter's doing.
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
        publish, why = True, f"adapter beats base by {improvement:+.3f} > publish.min_improvement={threshold}"
    elif cfg.publish.force:
        publish, why = True, f"forced (publish.force=True); improvement {improvement}"
    else:
        publish, why = False, (f"adapter does not beat base: {improvement:+.3f} <= publish.min_improvement={threshold}; "
                               "set publish.force=True to publish anyway")
    return {
        "base_reward": base,
        "adapter_reward": adapter,
        "base_acc": train_outputs.get("val_acc_before"),
        "adapter_acc": train_outputs.get("val_acc_after"),
        "improvement": improvement,
        "min_improvement": threshold,
        "publish": publish,
        "decision": ("publish: " if publish else "skip: ") + why,
    }
