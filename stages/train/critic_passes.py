"""The PPO critic's passes on an actor worker: the values of a batch, and the clipped value-loss update.

Both cut micro-batches with the actor's micro-batcher (`ActorWorker._micro_batches`: sorted by length and
trimmed with `use_remove_padding`), and the update weights each micro-batch's loss by its share of the
mini-batch under `critic.loss_agg_mode` (`micro_batching.loss_weight`), so the gradient is the whole
mini-batch's however its rows are grouped. (Before, each micro-batch's mean loss counted 1/n, which is not the
mini-batch's token mean when micro-batches hold different numbers of tokens.)
"""

from __future__ import annotations

import math

import torch

from stages.train.micro_batching import MicroBatch, loss_weight, mini_batch_rows, scatter_rows


def _value_predictions(worker, mb: MicroBatch) -> torch.Tensor:
    """[b, width]: the value of the state before response token t sits at the position that predicts it."""
    data = mb.data
    values = worker.model(data["input_ids"], data["attention_mask"], data["position_ids"], mode="value")
    return values[:, -mb.width - 1 : -1]


@torch.no_grad()
def compute_values(worker, batch: dict) -> torch.Tensor:
    """Values [B, R] (CPU) of the batch's response positions, in the batch's row order."""
    worker.model.eval()
    n, r = batch["responses"].shape
    size = worker.cfg.critic.ppo_micro_batch_size_per_gpu
    parts = [(mb, _value_predictions(worker, mb).float().cpu())
             for mb in worker._micro_batches(worker._to_device(batch), size, None)]
    return scatter_rows(parts, n, r)


def update_critic(worker, batch: dict, num_mini_batches: int) -> dict:
    """critic.ppo_epochs (default: the actor's) over mini-batches in order, one optimizer step each."""
    from stages.train.gather import full_tensor
    from stages.train.losses import compute_value_loss

    critic = worker.cfg.critic
    epochs = critic.ppo_epochs or worker.cfg.actor_rollout_ref.actor.ppo_epochs
    worker.model.train()
    batch = worker._to_device(batch)
    n = batch["responses"].shape[0]
    losses, clipfracs, norms = [], [], []
    for _ in range(epochs):
        for rows in mini_batch_rows(n, math.ceil(n / num_mini_batches), shuffle=False, seed=0):
            mini_batch = {k: v.index_select(0, rows.to(v.device)) for k, v in batch.items()}
            worker.critic_optimizer.zero_grad(set_to_none=True)
            mini_loss = 0.0
            for micro in worker._micro_batches(mini_batch, critic.ppo_micro_batch_size_per_gpu, None):
                mb, mask = micro.data, micro.data["response_mask"]
                vpreds = _value_predictions(worker, micro)
                loss, clipfrac = compute_value_loss(vpreds, mb["returns"], mb["values"], mask,
                                                    critic.cliprange_value, critic.loss_agg_mode)
                if mask.sum() == 0:  # a padding-only micro-batch still joins FSDP's collectives
                    loss = vpreds.sum() * 0.0
                weight = loss_weight(micro, mini_batch["response_mask"], critic.loss_agg_mode)
                (loss * weight).backward()
                mini_loss += loss.item() * weight
                if not micro.dummy:
                    clipfracs.append(clipfrac)
            losses.append(mini_loss)
            norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(worker.critic_params, critic.grad_clip)))
            if math.isfinite(norm):
                worker.critic_optimizer.step()
            norms.append(norm)
    worker.critic_scheduler.step()
    return {"critic/vf_loss": sum(losses) / len(losses),
            "critic/vf_clipfrac": sum(clipfracs) / max(len(clipfracs), 1),
            "critic/grad_norm": sum(norms) / len(norms)}
