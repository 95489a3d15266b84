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


def _dealt_rows(worker, monkeypatch, *, shuffle: bool, seed: int = 1) -> list[list[int]]:
    """The batch rows of each mini-batch one update (2 epochs x 2 mini-batches of 6 rows) dealt, in order."""
    worker.cfg.actor_rollout_ref.actor.shuffle = shuffle
    worker.cfg.actor_rollout_ref.actor.ppo_epochs = 2
    worker.cfg.trainer.seed = seed
    seen = []
    cut = type(worker)._micro_batches

    def spy(self, batch, *args, **kwargs):
        seen.append(batch["row_id"].tolist())
        return cut(self, batch, *args, **kwargs)

    monkeypatch.setattr(type(worker), "_micro_batches", spy)
    batch = ragged_batch(seed=4, rows=12)
    batch["row_id"] = torch.arange(12)
    update = worker.scheduler.last_epoch
    try:
        worker.update_actor(batch, num_mini_batches=2, reuse_forward_as_old=False)
    finally:
        monkeypatch.undo()
        worker.cfg.actor_rollout_ref.actor.ppo_epochs = 1
    assert worker.scheduler.last_epoch == update + 1
    return seen, update


def test_shuffle_deals_seeded_mini_batches_anew_each_epoch_and_in_order_without_it(worker, monkeypatch):
    from stages.train.micro_batching import mini_batch_rows, shuffle_seed

    in_order, _ = _dealt_rows(worker, monkeypatch, shuffle=False)
    assert in_order == [list(range(6)), list(range(6, 12))] * 2

    dealt, update = _dealt_rows(worker, monkeypatch, shuffle=True)
    epochs = [dealt[0] + dealt[1], dealt[2] + dealt[3]]
    assert all(sorted(rows) == list(range(12)) for rows in epochs)
    assert epochs[0] != epochs[1] and epochs[0] != list(range(12))
    # the seed (trainer.seed, update number, epoch) decides the deal: the same seed deals the same mini-batches
    expected = [r.tolist() for e in range(2) for r in
                mini_batch_rows(12, 6, shuffle=True, seed=shuffle_seed(1, update, e))]
    assert dealt == expected
    other_seed, update = _dealt_rows(worker, monkeypatch, shuffle=True, seed=7)
    assert other_seed == [r.tolist() for e in range(2) for r in
                          mini_batch_rows(12, 6, shuffle=True, seed=shuffle_seed(7, update, e))]
    assert other_seed[:2] != [r.tolist() for r in mini_batch_rows(12, 6, shuffle=True, seed=shuffle_seed(1, update, 0))]
    worker.cfg.actor_rollout_ref.actor.shuffle = False


def test_the_reference_pass_uses_the_refs_micro_batch_size(worker, monkeypatch):
    arr = worker.cfg.actor_rollout_ref
    arr.rollout.log_prob_micro_batch_size_per_gpu = 16
    arr.ref.log_prob_micro_batch_size_per_gpu = 3
    sizes = {}
    forward = type(worker)._forward_log_probs

    def spy(self, mb, mode, *args, **kwargs):
        sizes.setdefault(mode, []).append(mb["input_ids"].shape[0])
        return forward(self, mb, mode, *args, **kwargs)

    monkeypatch.setattr(type(worker), "_forward_log_probs", spy)
    batch = ragged_batch(seed=2, rows=12)
    ref = worker.compute_log_probs(batch, "ref")["log_probs"]
    policy = worker.compute_log_probs(batch, "policy")["log_probs"]
    assert sizes["ref"] == [3, 3, 3, 3] and sizes["policy"] == [12]
    assert ref.shape == policy.shape == batch["responses"].shape


def test_rollout_correction_in_the_loss_is_the_same_packed_and_padded(worker):
    """One micro-batch of ragged rows: the rollout_corr/ metrics equal the whole batch's, computed directly,
    and the corrected loss is the same with padding trimmed (use_remove_padding) and with full padding."""
    from stages.train import rollout_corr

    arr, rc = worker.cfg.actor_rollout_ref, worker.cfg.algorithm.rollout_correction
    batch = ragged_batch(seed=5, rows=12)
    gen = torch.Generator().manual_seed(5)
    # the engine's log-probs: the old ones plus a mismatch of up to +-0.7 per real token
    batch["rollout_log_probs"] = batch["old_log_probs"] + (torch.rand(batch["old_log_probs"].shape, generator=gen)
                                                           - 0.5) * 1.4 * batch["response_mask"]
    expected = rollout_corr.mismatch_metrics(batch["old_log_probs"], batch["rollout_log_probs"],
                                             batch["response_mask"])
    arr.actor.ppo_micro_batch_size_per_gpu = 16
    results = {}
    try:
        for label, is_level, trim in (("off", None, True), ("packed", "token", True), ("padded", "token", False)):
            rc.rollout_is, rc.rollout_rs, rc.rollout_rs_threshold = is_level, "token_k1", "0.6_1.6"
            if is_level is None:
                rc.rollout_rs = rc.rollout_rs_threshold = None
            arr.model.use_remove_padding = trim
            results[label] = worker.update_actor({k: v.clone() for k, v in batch.items()}, num_mini_batches=1,
                                                 reuse_forward_as_old=False)
    finally:
        rc.rollout_is = rc.rollout_rs = rc.rollout_rs_threshold = None
        arr.model.use_remove_padding = True
        arr.actor.ppo_micro_batch_size_per_gpu = 8
    for label in ("off", "packed", "padded"):
        for key, value in expected.items():
            assert results[label][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (label, key)
    assert results["packed"]["actor/pg_loss"] == pytest.approx(results["padded"]["actor/pg_loss"], rel=1e-4)
    assert results["packed"]["rollout_corr/rollout_rs_masked_fraction"] > 0
    assert results["packed"]["actor/pg_loss"] != pytest.approx(results["off"]["actor/pg_loss"], rel=1e-3)
