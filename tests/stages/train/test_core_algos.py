"""Advantage estimators and DAPO shaping against hand-computed values and their defining invariants."""

from __future__ import annotations

import math

import pytest
import torch

from config import AlgorithmConfig, Config
from ground.errors import ConfigError
from stages.train import core_algos as ca


def outcome_rewards(scores, lengths, width):
    """Outcome rewards on each response's last token, and the right-padded mask."""
    rewards = torch.zeros(len(scores), width)
    mask = torch.zeros(len(scores), width)
    for i, (s, n) in enumerate(zip(scores, lengths)):
        mask[i, :n] = 1
        rewards[i, n - 1] = s
    return rewards, mask


# --------------------------------------------------------------------------------------------- registry


def test_registry_names_and_recipes():
    assert set(ca.ADV_ESTIMATORS) >= {"gae", "grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline",
                                      "remax"}
    assert ca.resolve_adv_estimator_name("ppo") == "gae"
    assert ca.resolve_adv_estimator_name("dapo") == "grpo"
    assert ca.get_adv_estimator("dapo") is ca.compute_grpo_advantage
    assert ca.needs_critic("ppo") and not ca.needs_critic("grpo")
    assert ca.needs_greedy_baseline("remax") and not ca.needs_greedy_baseline("rloo")


def test_unknown_estimator_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        ca.get_adv_estimator("grpoo")
    msg = str(err.value)
    assert "grpoo" in msg and "algorithm.adv_estimator" in msg and "rloo" in msg and "ppo (= gae)" in msg


def test_check_algorithm_names():
    ca.check_algorithm_names(Config())
    bad = Config()
    bad.actor_rollout_ref.actor.kl_loss_type = "k9"
    with pytest.raises(ConfigError, match="kl_loss_type='k9'"):
        ca.check_algorithm_names(bad)


# ---------------------------------------------------------------------------------------------------- GRPO


def test_grpo_hand_computed_and_zero_mean_per_group():
    rewards, mask = outcome_rewards([1.0, 0.0, 0.0, 1.0, 1.0, 0.0], [3, 2, 4, 1, 2, 4], 4)
    index = ["a", "a", "a", "b", "b", "b"]
    adv, ret = ca.compute_grpo_advantage(rewards, mask, index, AlgorithmConfig())
    # group a: scores 1,0,0, mean 1/3, unbiased std sqrt(1/3)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    assert adv[0, 0].item() == pytest.approx((2 / 3) / std, rel=1e-5)
    assert adv[1, 0].item() == pytest.approx((-1 / 3) / std, rel=1e-5)
    assert torch.equal(adv, ret)
    assert torch.all(adv[mask == 0] == 0)
    # the same advantage on every token of a response
    assert torch.allclose(adv[2], torch.full((4,), adv[2, 0].item()))
    for g in ("a", "b"):
        rows = [i for i, k in enumerate(index) if k == g]
        assert adv[rows, 0].mean().item() == pytest.approx(0.0, abs=1e-6)


def test_dr_grpo_skips_std_division():
    rewards, mask = outcome_rewards([2.0, 0.0, 1.0, 1.0], [1, 1, 2, 2], 2)
    cfg = AlgorithmConfig(norm_adv_by_std_in_grpo=False)
    adv, _ = ca.compute_grpo_advantage(rewards, mask, [0, 0, 1, 1], cfg)
    assert adv[:, 0].tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0])


def test_grpo_uniform_group_gives_zero_and_singleton_keeps_score():
    rewards, mask = outcome_rewards([1.0, 1.0, 0.7], [1, 1, 1], 1)
    adv, _ = ca.compute_grpo_advantage(rewards, mask, ["u", "u", "solo"], AlgorithmConfig())
    assert adv[:, 0].tolist() == pytest.approx([0.0, 0.0, 0.7])


# ---------------------------------------------------------------------------------------------------- RLOO


def test_rloo_equals_scaled_mean_centred_reward():
    torch.manual_seed(0)
    scores = torch.rand(8).tolist()
    rewards, mask = outcome_rewards(scores, [3, 1, 2, 3, 3, 2, 1, 3], 3)
    index = ["p", "p", "p", "p", "q", "q", "q", "q"]
    adv, _ = ca.compute_rloo_advantage(rewards, mask, index, AlgorithmConfig())
    s = torch.tensor(scores)
    for rows in (slice(0, 4), slice(4, 8)):
        g = s[rows]
        expected = 4 / 3 * (g - g.mean())
        assert torch.allclose(adv[rows, 0], expected, atol=1e-6)
    # hand example: scores 1, 0, 0 -> 1 - 0 = 1, 0 - 0.5 = -0.5
    r2, m2 = outcome_rewards([1.0, 0.0, 0.0], [1, 1, 1], 1)
    adv2, _ = ca.compute_rloo_advantage(r2, m2, ["x"] * 3, AlgorithmConfig())
    assert adv2[:, 0].tolist() == pytest.approx([1.0, -0.5, -0.5])


# ----------------------------------------------------------------------------------------------------- GAE


def plain_gae(rewards, values, length, gamma, lam):
    """The textbook reverse loop over one response of `length` tokens."""
    adv = [0.0] * length
    last = 0.0
    for t in reversed(range(length)):
        next_v = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


def test_gae_matches_plain_reverse_loop():
    torch.manual_seed(1)
    lengths = [5, 3, 1, 4]
    width = 5
    mask = torch.zeros(4, width)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    rewards = torch.randn(4, width) * mask
    values = torch.randn(4, width)  # garbage in the padding on purpose: it must not leak in
    cfg = AlgorithmConfig(gamma=0.9, lam=0.8)
    adv, ret = ca.compute_gae_advantage(rewards, mask, None, cfg, values=values)

    raw = torch.zeros(4, width)
    for i, n in enumerate(lengths):
        raw[i, :n] = torch.tensor(plain_gae(rewards[i].tolist(), values[i].tolist(), n, 0.9, 0.8))
    assert torch.allclose(ret, (raw + values) * mask, atol=1e-5)
    flat = raw[mask.bool()]
    whitened = (flat - flat.mean()) / flat.std()
    assert torch.allclose(adv[mask.bool()], whitened, atol=1e-4)
    assert torch.all(adv[mask == 0] == 0)


def test_gae_hand_example_gamma_lambda_one():
    # gamma = lam = 1: A_t = sum of future rewards - V_t; one response [r = 0, 0, 1], V = [0.5, 0.5, 0.5]
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    mask = torch.ones(1, 3)
    values = torch.full((1, 3), 0.5)
    _, ret = ca.compute_gae_advantage(rewards, mask, None, AlgorithmConfig(), values=values)
    assert ret[0].tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_gae_requires_values():
    r, m = outcome_rewards([1.0], [1], 1)
    with pytest.raises(ValueError, match="values"):
        ca.compute_gae_advantage(r, m, None, AlgorithmConfig())


# ----------------------------------------------------------------------------------------- REINFORCE++ / ReMax


def test_reinforce_plus_plus_discounted_then_whitened():
    rewards = torch.tensor([[0.5, 0.0, 1.0], [0.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = ca.compute_reinforce_plus_plus_advantage(rewards, mask, None, AlgorithmConfig(gamma=0.5))
    # returns by hand: row 0: [0.5 + 0.5*(0 + 0.5*1), 0 + 0.5*1, 1] = [0.75, 0.5, 1]; row 1: [1, 2, 0]
    assert ret.tolist() == [pytest.approx([0.75, 0.5, 1.0]), pytest.approx([1.0, 2.0, 0.0])]
    valid = torch.tensor([0.75, 0.5, 1.0, 1.0, 2.0])
    expected = (valid - valid.mean()) / valid.std()
    assert torch.allclose(adv[mask.bool()], expected, atol=1e-4)
    assert adv[1, 2].item() == 0


def test_reinforce_plus_plus_baseline_subtracts_group_mean_then_whitens():
    rewards, mask = outcome_rewards([1.0, 0.0, 3.0, 1.0], [2, 1, 1, 2], 2)
    adv, _ = ca.compute_reinforce_plus_plus_baseline_advantage(rewards, mask, ["a", "a", "b", "b"], AlgorithmConfig())
    centred = torch.tensor([0.5, 0.5, -0.5, 1.0, -1.0, -1.0])  # token values, row by row
    expected = (centred - centred.mean()) / centred.std()
    assert torch.allclose(adv[mask.bool()], expected, atol=1e-4)


def test_remax_subtracts_greedy_baseline():
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv, ret = ca.compute_remax_advantage(rewards, mask, ["a", "b"], AlgorithmConfig(),
                                          reward_baselines=torch.tensor([0.25, 1.0]))
    assert ret.tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert adv.tolist() == [[0.75, 0.75], [-1.0, 0.0]]
    with pytest.raises(ValueError, match="reward_baselines"):
        ca.compute_remax_advantage(rewards, mask, ["a", "b"], AlgorithmConfig())


@pytest.mark.parametrize("name", ["gae", "grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "remax"])
def test_every_estimator_has_the_common_signature(name):
    rewards, mask = outcome_rewards([1.0, 0.0, 0.5, 0.5], [2, 3, 1, 3], 3)
    adv, ret = ca.get_adv_estimator(name)(rewards, mask, ["a", "a", "b", "b"], AlgorithmConfig(),
                                          values=torch.zeros(4, 3), reward_baselines=torch.zeros(4))
    assert adv.shape == ret.shape == (4, 3)
    assert torch.isfinite(adv).all() and torch.all(adv[mask == 0] == 0)


# ------------------------------------------------------------------------------------------------ DAPO shaping


def test_dynamic_sampling_drops_exactly_uniform_groups():
    index = ["a", "a", "b", "b", "b", "c", "c", "d"]
    acc = [1, 1, 0, 1, 0, 0, 0, 1]
    keep = ca.dynamic_sampling_keep(index, acc)
    # a: all 1 -> drop; b: mixed -> keep; c: all 0 -> drop; d: a lone response -> keep
    assert keep.tolist() == [False, False, True, True, True, False, False, True]
    with pytest.raises(ValueError, match="None"):
        ca.dynamic_sampling_keep(["a", "a"], [None, 1.0])


def test_overlong_penalty_linear_inside_buffer():
    pen = ca.overlong_penalty(torch.tensor([10, 12, 14, 16, 20]), max_response_length=16, buffer_len=4,
                              penalty_factor=1.0)
    assert pen.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])
    assert ca.overlong_penalty([13], 16, 4, 0.5).tolist() == pytest.approx([-0.125])
    with pytest.raises(ConfigError, match="overlong_buffer.len"):
        ca.overlong_penalty([1], 16, 0, 1.0)
