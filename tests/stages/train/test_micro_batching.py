"""Packed micro-batches (use_remove_padding, use_dynamic_bsz) give the padded computation's numbers.

The worker tests run one real ActorWorker (tiny model, FSDP2, world size 1 over gloo) in this process.
"""

from __future__ import annotations

import random

import pytest
import torch

from stages.train.batch import build_tensors
from stages.train.losses import LOSS_AGG_MODES, agg_loss
from stages.train.micro_batching import loss_weight, plan_rows, row_lengths, split_to_count, take
from tests.stages.train.toy_task import ragged_batch as _batch


@pytest.mark.parametrize("mode", sorted(LOSS_AGG_MODES))
@pytest.mark.parametrize("budget", [None, 40, 1])
def test_weighted_micro_batch_losses_sum_to_the_padded_loss(mode, budget):
    batch = _batch(seed=3)
    loss_mat = torch.randn(batch["response_mask"].shape, dtype=torch.float64)
    batch["loss_mat"] = loss_mat
    whole = agg_loss(loss_mat, batch["response_mask"], mode)
    groups = plan_rows(row_lengths(batch).tolist(), max_rows=5, max_tokens=budget, sort=True)
    groups = split_to_count(groups, len(groups) + 3)  # as when another rank needs more micro-batches
    total = 0.0
    for g in groups:
        mb = take(batch, g, trim=True)
        if mb.dummy:
            assert loss_weight(mb, batch["response_mask"], mode) == 0.0
            continue
        assert mb.data["loss_mat"].shape[1] <= loss_mat.shape[1]
        total += float(agg_loss(mb.data["loss_mat"], mb.data["response_mask"], mode)) * loss_weight(
            mb, batch["response_mask"], mode)
    assert total == pytest.approx(float(whole), rel=1e-9, abs=1e-12)


def test_plans_respect_the_token_budget_and_keep_every_row():
    lengths = [5, 40, 12, 33, 7, 7, 60, 2]
    groups = plan_rows(lengths, max_rows=100, max_tokens=70, sort=True)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 70
    assert [lengths[g[0]] for g in groups] == sorted((lengths[g[0]] for g in groups), reverse=True)
    more = split_to_count(groups, 9)
    assert len(more) == 9 and sorted(i for g in more for i in g) == list(range(len(lengths)))


# --------------------------------------------------------------------------------------- the real worker
@pytest.fixture(scope="module")
def worker(tiny_model_dir, tmp_path_factory):
    import torch.distributed as dist

    from tests.stages.train.toy_task import frozen_worker

    with frozen_worker(tiny_model_dir, tmp_path_factory.mktemp("mb"),
                       {"actor_rollout_ref.model.target_modules": "[q_proj,v_proj]"}) as w:
        yield w
    assert not dist.is_initialized()


def _configure(worker, *, remove_padding: bool, micro: int, budget: int | None, share: bool = False):
    arr = worker.cfg.actor_rollout_ref
    arr.model.use_remove_padding = remove_padding
    arr.model.share_prompt_forward = share
    arr.actor.ppo_micro_batch_size_per_gpu = micro
    arr.rollout.log_prob_micro_batch_size_per_gpu = micro
    arr.actor.use_dynamic_bsz = budget is not None
    arr.actor.ppo_max_token_len_per_gpu = budget or 16384


def _grads(worker, batch) -> list[torch.Tensor]:
    worker.update_actor(batch, num_mini_batches=1, reuse_forward_as_old=False)
    return [p.grad.full_tensor().clone() for p in worker.actor_params]


PACKED = [dict(remove_padding=True, micro=3, budget=None), dict(remove_padding=True, micro=64, budget=120),
          dict(remove_padding=False, micro=5, budget=None),
          # one packed row per prompt (shared_prompt.py): _batch's prompts are all distinct, groups of one
          dict(remove_padding=True, micro=5, budget=None, share=True)]


def test_log_probs_equal_the_padded_computation(worker):
    batch = _batch(seed=1)
    mask = batch["response_mask"].bool()
    _configure(worker, remove_padding=False, micro=64, budget=None)
    padded = worker.compute_log_probs(batch, with_entropy=True)
    for setting in PACKED:
        _configure(worker, **setting)
        packed = worker.compute_log_probs(batch, with_entropy=True)
        for key in ("log_probs", "entropy"):
            torch.testing.assert_close(packed[key][mask], padded[key][mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum-norm"])
def test_update_gradients_equal_the_padded_computation(worker, mode):
    batch = _batch(seed=2)
    worker.cfg.actor_rollout_ref.actor.loss_agg_mode = mode
    _configure(worker, remove_padding=False, micro=64, budget=None)  # one padded pass over the whole batch
    reference = _grads(worker, batch)
    assert any(float(g.abs().sum()) > 0 for g in reference)
    for setting in PACKED:
        _configure(worker, **setting)
        for got, want in zip(_grads(worker, batch), reference):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_log_probs_from_the_kept_response_logits_equal_the_full_forward(worker):
    """The worker asks the model for the last R + 1 positions' logits only; same log-probs as all positions."""
    from stages.train.modeling import response_log_probs

    batch = _batch(seed=4)
    _configure(worker, remove_padding=True, micro=4, budget=None)
    got = worker.compute_log_probs(batch)["log_probs"]
    worker.model.eval()
    with torch.no_grad():
        logits = worker.model(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    assert logits.shape[1] == batch["input_ids"].shape[1]
    want, _ = response_log_probs(logits, batch["responses"], worker.cfg.actor_rollout_ref.rollout.temperature)
    mask = batch["response_mask"].bool()
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- one forward per prompt (shared_prompt)
def _grouped_batch(seed: int = 5, prompts: int = 4, n: int = 4, vocab: int = 300) -> dict:
    """GRPO's shape: each prompt sampled n times, responses of different lengths (some empty), rows of one
    prompt not adjacent (as after a shuffle)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(prompts):
        prompt = [rng.randrange(5, vocab) for _ in range(rng.randint(3, 20))]
        rows += [(prompt, [rng.randrange(5, vocab) for _ in range(rng.choice([0, 1, 3, 9]))]) for _ in range(n)]
    rng.shuffle(rows)
    batch = build_tensors([p for p, _ in rows], [r for _, r in rows], pad_id=0)
    gen = torch.Generator().manual_seed(seed)
    shape = batch["response_mask"].shape
    batch["advantages"] = torch.randn(shape, generator=gen) * batch["response_mask"]
    batch["old_log_probs"] = -torch.rand(shape, generator=gen) * 3
    return batch


def test_pack_makes_one_row_per_prompt_with_each_response_seeing_its_prompt_and_itself():
    from stages.train import shared_prompt

    batch = _grouped_batch()
    packed = shared_prompt.pack(batch, torch.float32)
    assert packed.input_ids.shape[0] == 4  # four distinct prompts
    real = int(batch["attention_mask"].sum())
    prompt_tokens = int(batch["attention_mask"][:, : -batch["responses"].shape[1]].sum())
    # every prompt token once instead of n times
    assert int((packed.position_ids > 0).sum()) < real - prompt_tokens * 3 // 4 + packed.input_ids.shape[0]
    allowed = packed.attention_mask[:, 0] == 0
    prompt_lengths = batch["attention_mask"][:, : -batch["responses"].shape[1]].sum(-1)
    for row in range(batch["responses"].shape[0]):
        g = int(packed.row_group[row])
        n = int(batch["response_mask"][row].sum())
        cols = (packed.predictor[row, 1:n] + packed.prompt_end).tolist()
        for k, col in enumerate(cols):  # response token k sits at col; it sees the prompt and tokens 0..k
            assert int(packed.input_ids[g, col]) == int(batch["responses"][row, k])
            assert int(allowed[g, col].sum()) == int(prompt_lengths[row]) + k + 1


@pytest.mark.parametrize("micro", [4, 16])
def test_shared_prompt_log_probs_and_gradients_equal_the_padded_computation(worker, micro):
    batch = _grouped_batch()
    mask = batch["response_mask"].bool()
    worker.cfg.actor_rollout_ref.actor.loss_agg_mode = "token-mean"
    _configure(worker, remove_padding=False, micro=64, budget=None)
    padded = worker.compute_log_probs(batch, with_entropy=True)
    reference = _grads(worker, batch)
    _configure(worker, remove_padding=True, micro=micro, budget=None, share=True)
    shared = worker.compute_log_probs(batch, with_entropy=True)
    for key in ("log_probs", "entropy"):
        torch.testing.assert_close(shared[key][mask], padded[key][mask], rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(worker, batch), reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
