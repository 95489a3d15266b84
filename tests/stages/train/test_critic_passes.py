"""The PPO critic uses the actor's micro-batcher: its gradient and values do not depend on the grouping."""

from __future__ import annotations

import pytest
import torch

from tests.stages.train.toy_task import ragged_batch


@pytest.fixture(scope="module")
def worker(tiny_model_dir, tmp_path_factory):
    from tests.stages.train.toy_task import frozen_worker

    with frozen_worker(tiny_model_dir, tmp_path_factory.mktemp("critic"),
                       {"actor_rollout_ref.model.target_modules": "[q_proj,v_proj]"}, with_critic=True) as w:
        yield w


def _critic_batch() -> dict:
    batch = ragged_batch(seed=6, rows=12)
    gen = torch.Generator().manual_seed(6)
    mask = batch["response_mask"]
    batch["returns"] = torch.randn(mask.shape, generator=gen) * mask
    batch["values"] = torch.randn(mask.shape, generator=gen) * 0.1 * mask
    return batch


def _configure(worker, *, micro: int, remove_padding: bool = True, mode: str = "token-mean"):
    worker.cfg.critic.ppo_micro_batch_size_per_gpu = micro
    worker.cfg.critic.loss_agg_mode = mode
    worker.cfg.actor_rollout_ref.model.use_remove_padding = remove_padding


def _critic_grads(worker, batch) -> list[torch.Tensor]:
    worker.update_critic(batch, num_mini_batches=1)
    return [p.grad.full_tensor().clone() if hasattr(p.grad, "full_tensor") else p.grad.clone()
            for p in worker.critic_params]


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_critic_gradient_over_micro_batches_equals_the_whole_batch_at_once(worker, mode):
    batch = _critic_batch()
    _configure(worker, micro=64, remove_padding=False, mode=mode)  # the whole mini-batch in one padded pass
    whole = _critic_grads(worker, batch)
    assert any(g.abs().sum() > 0 for g in whole)
    for micro in (3, 5):  # micro-batches with different numbers of tokens (responses of 0-16 tokens)
        _configure(worker, micro=micro, mode=mode)
        for a, b in zip(whole, _critic_grads(worker, batch)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_values_do_not_depend_on_the_micro_batches(worker):
    batch = _critic_batch()
    _configure(worker, micro=64, remove_padding=False)
    padded = worker.compute_values(batch) * batch["response_mask"]
    _configure(worker, micro=5)
    trimmed = worker.compute_values(batch) * batch["response_mask"]
    torch.testing.assert_close(trimmed, padded, rtol=1e-4, atol=1e-5)
