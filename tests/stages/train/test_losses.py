"""Policy losses, aggregation modes, value loss, entropy and KL against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from config import ActorConfig, KLControlConfig
from ground.errors import ConfigError
from stages.train import core_algos as ca

RAGGED_MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
LOSS_MAT = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0], [1.0, 1.0, 1.0, 5.0]])


# ----------------------------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", (6 + 4 + 8) / 8),
    ("seq-mean-token-mean", (6 / 3 + 4 / 1 + 8 / 4) / 3),
    ("seq-mean-token-sum", (6 + 4 + 8) / 3),
    ("seq-mean-token-sum-norm", (6 + 4 + 8) / (3 * 4)),
])
def test_aggregation_modes_on_ragged_mask(mode, expected):
    assert ca.agg_loss(LOSS_MAT, RAGGED_MASK, mode).item() == pytest.approx(expected)
    assert mode in ca.LOSS_AGG_MODES


def test_seq_mean_token_mean_skips_empty_responses():
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert ca.agg_loss(torch.tensor([[2.0, 4.0], [9.0, 9.0]]), mask, "seq-mean-token-mean").item() == 3.0


def test_bad_aggregation_mode_lists_valid_ones():
    with pytest.raises(ConfigError) as err:
        ca.agg_loss(LOSS_MAT, RAGGED_MASK, "token-sum")
    assert "token-sum" in str(err.value) and "seq-mean-token-sum-norm" in str(err.value)


# ---------------------------------------------------------------------------------------------- vanilla PPO


def test_ratio_one_gives_negative_advantage():
    adv = torch.tensor([[0.5, -1.0, 2.0], [-0.25, 3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    logp = torch.randn(2, 3)
    loss, metrics = ca.get_policy_loss_fn("vanilla")(logp, logp.clone(), adv, mask, "token-mean", ActorConfig())
    assert loss.item() == pytest.approx(-(0.5 - 1.0 + 2.0 - 0.25 + 3.0) / 5)
    assert metrics["pg_clipfrac"] == 0 and metrics["pg_clipfrac_lower"] == 0 and metrics["ppo_kl"] == 0


def test_clipping_activates_exactly_outside_the_range():
    low, high = 0.2, 0.28
    cfg = ActorConfig(clip_ratio_low=low, clip_ratio_high=high)
    ratios = torch.tensor([0.7, 0.79, 0.81, 1.0, 1.27, 1.29, 1.6])
    old = torch.zeros(2, 7)
    new = torch.log(ratios).repeat(2, 1).requires_grad_(True)
    adv = torch.tensor([[1.0] * 7, [-1.0] * 7])  # row 0 positive, row 1 negative advantages
    mask = torch.ones(2, 7)
    loss, metrics = ca.get_policy_loss_fn("vanilla")(old, new, adv, mask, "token-mean", cfg)
    loss.backward()
    # With A > 0 the bound binds above 1+high; with A < 0 below 1-low. A clipped token gets no gradient.
    clipped_pos = (ratios > 1 + high).tolist()
    clipped_neg = (ratios < 1 - low).tolist()
    assert [g == 0 for g in new.grad[0].tolist()] == clipped_pos
    assert [g == 0 for g in new.grad[1].tolist()] == clipped_neg
    assert metrics["pg_clipfrac"] == pytest.approx((sum(clipped_pos) + sum(clipped_neg)) / 14)
    # hand value: mean over tokens of max(-A r, -A clip(r))
    clip_r = ratios.clamp(1 - low, 1 + high)
    expected = (torch.maximum(-ratios, -clip_r).sum() + torch.maximum(ratios, clip_r).sum()) / 14
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_clip_ratio_falls_back_and_dual_clip_bounds_negative_tokens():
    cfg = ActorConfig(clip_ratio=0.1, clip_ratio_c=3.0)
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[5.0, 1.05, 1.2]]))
    adv = torch.tensor([[-2.0, -2.0, 1.0]])
    loss, metrics = ca.get_policy_loss_fn("vanilla")(old, new, adv, torch.ones(1, 3), "seq-mean-token-sum", cfg)
    # token 0: ratio 5 with A=-2: max(10, 2*1.1) = 10, dual-clip caps it at 3*2 = 6
    # token 1: ratio 1.05 inside [0.9, 1.1]: 2.1; token 2: ratio 1.2 with A=1 -> clipped to -1.1
    assert loss.item() == pytest.approx(6.0 + 2.1 - 1.1, rel=1e-5)
    assert metrics["pg_clipfrac_lower"] == pytest.approx(1 / 3)
    assert metrics["pg_clipfrac"] == pytest.approx(1 / 3)  # token 2 (token 0's clip bound is not the max)
    assert metrics["ppo_kl"] == pytest.approx(-(math.log(5) + math.log(1.05) + math.log(1.2)) / 3, rel=1e-5)


def test_bad_clip_settings_are_config_errors():
    with pytest.raises(ConfigError, match="clip_ratio_c"):
        ca.get_policy_loss_fn("vanilla")(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1),
                                         "token-mean", ActorConfig(clip_ratio_c=1.0))
    with pytest.raises(ConfigError, match="loss_mode='ppo2'"):
        ca.get_policy_loss_fn("ppo2")


# ----------------------------------------------------------------------------------------------------- GSPO


def test_gspo_uses_the_sequence_ratio():
    old = torch.zeros(2, 2)
    # row 0: token log-ratios 0.1 and 0.3 -> sequence ratio exp(0.2); row 1: exp(-0.5) per token, one token only
    new = torch.tensor([[0.1, 0.3], [-0.5, 7.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    cfg = ActorConfig(clip_ratio_low=0.3, clip_ratio_high=0.3)
    loss, metrics = ca.get_policy_loss_fn("gspo")(old, new, adv, mask, "seq-mean-token-mean", cfg)
    s0, s1 = math.exp(0.2), math.exp(-0.5)  # s1 = 0.607 < 0.7 -> clipped: loss +0.7, no gradient
    assert loss.item() == pytest.approx((-s0 + 0.7) / 2, rel=1e-5)
    assert metrics["pg_clipfrac"] == pytest.approx(1 / 3)
    loss.backward()
    # each token of row 0 gets d/dlogp of -s0 * A / 2 tokens / 2 responses
    assert new.grad[0].tolist() == pytest.approx([-s0 / 4, -s0 / 4], rel=1e-5)
    assert new.grad[1].tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------- value, entropy


def test_value_loss_clips_far_moves():
    values = torch.tensor([[0.0, 0.0]])
    vpreds = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[2.0, 0.0]])
    loss, clipfrac = ca.compute_value_loss(vpreds, returns, values, torch.ones(1, 2), 0.5, "token-mean")
    # token 0: clipped pred 0.5 -> (1.5)^2 = 2.25 > (1)^2; token 1: 0.1 within range -> 0.01
    assert loss.item() == pytest.approx(0.5 * (2.25 + 0.01) / 2)
    assert clipfrac == pytest.approx(0.5)


def test_entropy_from_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    ent = ca.entropy_from_logits(logits)
    assert ent.shape == (1, 2)
    assert ent[0].tolist() == pytest.approx([math.log(4), 0.0], abs=1e-5)
    probs = torch.softmax(torch.randn(3, 5, 7), -1)
    assert torch.allclose(ca.entropy_from_logits(probs.log()), -(probs * probs.log()).sum(-1), atol=1e-5)


# -------------------------------------------------------------------------------------------------------- KL


@pytest.mark.parametrize("kind", sorted(ca.KL_ESTIMATORS))
def test_kl_zero_at_equal_log_probs(kind):
    logp = torch.randn(3, 5)
    assert torch.all(ca.kl_penalty(logp, logp.clone(), kind) == 0)


def test_kl_hand_values_and_k3_never_negative():
    lp, ref = torch.tensor([[-1.0]]), torch.tensor([[-2.0]])
    assert ca.kl_penalty(lp, ref, "k1").item() == pytest.approx(1.0)
    assert ca.kl_penalty(ref, lp, "abs").item() == pytest.approx(1.0)
    assert ca.kl_penalty(lp, ref, "mse").item() == pytest.approx(0.5)
    assert ca.kl_penalty(lp, ref, "low_var_kl").item() == pytest.approx(math.exp(-1) - 1 + 1)
    torch.manual_seed(0)
    a, b = torch.randn(1000) * 10, torch.randn(1000) * 10
    k3 = ca.kl_penalty(a, b, "k3")
    assert torch.all(k3 >= 0) and torch.all(k3 <= 10) and torch.isfinite(k3).all()


def test_k3_plus_has_k3_value_and_k2_gradient():
    lp = torch.tensor([-1.0, -0.2], requires_grad=True)
    ref = torch.tensor([-2.0, -0.1])
    value = ca.kl_penalty(lp, ref, "k3+")
    assert torch.allclose(value, ca.kl_penalty(lp, ref, "k3"))
    value.sum().backward()
    assert lp.grad.tolist() == pytest.approx((lp - ref).tolist())  # d/dlp of (lp - ref)^2 / 2


def test_unknown_kl_kind():
    with pytest.raises(ConfigError, match="k4"):
        ca.kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


def test_kl_controllers():
    fixed = ca.make_kl_controller(KLControlConfig(type="fixed", kl_coef=0.05))
    fixed.update(10.0, 100)
    assert fixed.value == 0.05
    adaptive = ca.make_kl_controller(KLControlConfig(type="adaptive", kl_coef=0.1, target_kl=0.1, horizon=100))
    adaptive.update(0.5, n_steps=10)  # error clipped to +0.2 -> x(1 + 0.2 * 10/100)
    assert adaptive.value == pytest.approx(0.1 * 1.02)
    adaptive.update(0.09, n_steps=10)  # error -0.1 -> x(1 - 0.01)
    assert adaptive.value == pytest.approx(0.1 * 1.02 * 0.99)


def test_apply_kl_penalty():
    scores = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    lp = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0], [-2.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    ctrl = ca.FixedKLController(0.1)
    rewards, metrics = ca.apply_kl_penalty(scores, lp, ref, mask, ctrl, "k1")
    assert rewards.tolist() == [pytest.approx([-0.05, 1.0]), pytest.approx([-0.1, 0.0])]
    assert metrics["actor/reward_kl_penalty"] == pytest.approx((0.25 + 1.0) / 2)
    assert metrics["actor/reward_kl_penalty_coeff"] == 0.1
