"""The actor worker's update keeps autograd for the entropy only when entropy_coeff puts it in the loss."""

from __future__ import annotations

import pytest
import torch

from tests.stages.train.toy_task import ragged_batch


@pytest.fixture(scope="module")
def worker(tiny_model_dir, tmp_path_factory):
    from tests.stages.train.toy_task import frozen_worker

    with frozen_worker(tiny_model_dir, tmp_path_factory.mktemp("aw")) as w:
        yield w


def _update(worker, monkeypatch, coeff: float):
    """One update with entropy_coeff=coeff -> (entropies the forward returned, LoRA gradients, metrics)."""
    worker.cfg.actor_rollout_ref.actor.entropy_coeff = coeff
    seen = []
    forward = type(worker)._forward_log_probs

    def spy(self, *args, **kwargs):
        log_probs, entropy = forward(self, *args, **kwargs)
        seen.append(entropy)
        return log_probs, entropy

    monkeypatch.setattr(type(worker), "_forward_log_probs", spy)
    metrics = worker.update_actor(ragged_batch(seed=4, rows=6), num_mini_batches=1, reuse_forward_as_old=True)
    monkeypatch.undo()
    return seen, [p.grad.full_tensor().clone() for p in worker.actor_params], metrics


def test_entropy_is_a_metric_without_autograd_unless_it_is_in_the_loss(worker, monkeypatch):
    seen, grads, metrics = _update(worker, monkeypatch, coeff=0.0)
    assert seen and all(e is not None and not e.requires_grad for e in seen)

    seen_in_loss, grads_in_loss, metrics_in_loss = _update(worker, monkeypatch, coeff=0.5)
    assert seen_in_loss and all(e.requires_grad for e in seen_in_loss)
    # the entropy term reaches the gradient, and the metric is the same number either way
    assert any(not torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(grads, grads_in_loss))
    assert metrics["actor/entropy"] == pytest.approx(metrics_in_loss["actor/entropy"], rel=1e-6)
