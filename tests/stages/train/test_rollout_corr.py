"""Rollout correction (stages/train/rollout_corr.py) against values worked out by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from config.schema import Config
from ground.errors import ConfigError
from stages.train import rollout_corr
from stages.train.losses import vanilla_policy_loss

ln = math.log
# row 0: three real tokens with ratios 0.5, 3, 1; row 1: one real token (ratio 1.5) then padding whose log-ratio
# is deliberately huge, so a mask that leaks shows up in every expected value.
LOG_RATIO = torch.tensor([[ln(0.5), ln(3.0), 0.0], [ln(1.5), ln(100.0), ln(100.0)]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def _rc(**kw):
    fields = dict(rollout_is=None, rollout_is_threshold=2.0, rollout_rs=None, rollout_rs_threshold=None,
                  bypass_mode=False)
    return SimpleNamespace(**{**fields, **kw})


def test_token_tis_truncates_each_token_at_the_threshold_and_zeroes_padding():
    w = rollout_corr.is_weights(LOG_RATIO, MASK, "token", 2.0)
    assert torch.allclose(w, torch.tensor([[0.5, 2.0, 1.0], [1.5, 0.0, 0.0]]))


def test_sequence_tis_puts_the_truncated_product_on_every_real_token():
    # row 0: 0.5 * 3 * 1 = 1.5; row 1: 1.5 (the padding's log-ratio must not enter the product)
    w = rollout_corr.is_weights(LOG_RATIO, MASK, "sequence", 2.0)
    assert torch.allclose(w, torch.tensor([[1.5, 1.5, 1.5], [1.5, 0.0, 0.0]]))
    # with a cap of 1.2 both products are truncated
    w = rollout_corr.is_weights(LOG_RATIO, MASK, "sequence", 1.2)
    assert torch.allclose(w, torch.tensor([[1.2, 1.2, 1.2], [1.2, 0.0, 0.0]]))


def test_token_k1_rejection_keeps_ratios_inside_the_bounds_only():
    keep = rollout_corr.rejection_mask(LOG_RATIO, MASK, "token_k1", "0.6_2.0")
    assert keep.tolist() == [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    # a single value U means the bounds 1/U .. U: 0.5 is inside 1/2.5, 3 is not
    keep = rollout_corr.rejection_mask(LOG_RATIO, MASK, "token_k1", 2.5)
    assert keep.tolist() == [[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]]


def test_sequence_rejection_drops_whole_responses():
    # seq_mean_k3: row 0 mean of r-1-log r = ((0.5-1+ln2) + (3-1-ln3) + 0)/3 = 0.2303; row 1: 0.5-ln1.5 = 0.0945
    k3_row0 = ((0.5 - 1 - ln(0.5)) + (3 - 1 - ln(3.0))) / 3
    k3_row1 = 1.5 - 1 - ln(1.5)
    assert k3_row1 < 0.15 < k3_row0
    keep = rollout_corr.rejection_mask(LOG_RATIO, MASK, "seq_mean_k3", 0.15)
    assert keep.tolist() == [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    # seq_sum_k1 with ratio bounds: row 0's product 1.5 and row 1's 1.5 are inside 1/1.6 .. 1.6; not inside 1.4
    assert rollout_corr.rejection_mask(LOG_RATIO, MASK, "seq_sum_k1", 1.6).tolist() == MASK.tolist()
    assert rollout_corr.rejection_mask(LOG_RATIO, MASK, "seq_sum_k1", 1.4).sum() == 0
    # two options must both accept: token_k1 drops row 0's second token, seq_mean_k3 drops row 0 altogether
    both = rollout_corr.rejection_mask(LOG_RATIO, MASK, "token_k1,seq_mean_k3", "2.5,0.15")
    assert both.tolist() == [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]


def test_mismatch_metrics_by_hand():
    # one response of two tokens: the actor's ratios to the engine are 2 and 1
    rollout = torch.tensor([[-1.0, -2.0, -7.0]])
    train = torch.tensor([[-1.0 + ln(2.0), -2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    m = rollout_corr.mismatch_metrics(train, rollout, mask)
    assert m["rollout_corr/kl"] == pytest.approx(-ln(2.0) / 2)
    assert m["rollout_corr/k3_kl"] == pytest.approx((1 - ln(2.0)) / 2)
    assert m["rollout_corr/log_ppl_abs_diff"] == pytest.approx(ln(2.0) / 2)
    assert m["rollout_corr/chi2_token"] == pytest.approx((4 + 1) / 2 - 1)
    assert m["rollout_corr/rollout_is_mean"] == pytest.approx(1.5)
    equal = rollout_corr.mismatch_metrics(rollout, rollout, mask)
    assert equal["rollout_corr/k3_kl"] == 0 and equal["rollout_corr/chi2_token"] == 0


def test_correct_scales_the_policy_loss_per_token_and_masks_rejected_tokens():
    rollout = torch.zeros(2, 3)
    old = LOG_RATIO.clone()  # old - rollout = the log-ratios above
    new = old + torch.tensor([[0.1, -0.3, 0.05], [0.2, 0.0, 0.0]])
    adv = torch.tensor([[1.0, -2.0, 0.5], [-1.0, -1.0, -1.0]])
    actor_cfg = SimpleNamespace(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=3.0)

    off_adv, off_mask, metrics = rollout_corr.correct(_rc(), old, rollout, adv, MASK)
    assert torch.equal(off_adv, adv) and torch.equal(off_mask, MASK)  # off: measured only
    assert set(metrics) == {f"rollout_corr/{k}" for k in
                            ("kl", "k3_kl", "log_ppl_abs_diff", "chi2_token", "rollout_is_mean")}

    w_adv, w_mask, _ = rollout_corr.correct(_rc(rollout_is="token"), old, rollout, adv, MASK)
    weights = torch.tensor([[0.5, 2.0, 1.0], [1.5, 0.0, 0.0]])
    # the weighted advantage gives exactly w times each token's PPO loss (dual-clip included): sum-aggregated
    weighted = vanilla_policy_loss(old, new, w_adv, w_mask, "seq-mean-token-sum", actor_cfg)[0]
    by_hand = sum(
        vanilla_policy_loss(old[i:i + 1, [t]], new[i:i + 1, [t]], adv[i:i + 1, [t]], MASK[i:i + 1, [t]],
                            "seq-mean-token-sum", actor_cfg)[0] * weights[i, t]
        for i in range(2) for t in range(3)) / 2
    assert weighted.item() == pytest.approx(by_hand.item(), rel=1e-6)

    rs_adv, rs_mask, rs_metrics = rollout_corr.correct(
        _rc(rollout_rs="token_k1", rollout_rs_threshold="0.6_2.0"), old, rollout, adv, MASK)
    assert rs_mask.tolist() == [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    assert rs_metrics["rollout_corr/rollout_rs_masked_fraction"] == pytest.approx(0.5)


def test_bypass_mode_applies_no_importance_weight():
    adv = torch.ones(2, 3)
    out, _, _ = rollout_corr.correct(_rc(rollout_is="token", bypass_mode=True), LOG_RATIO, torch.zeros(2, 3), adv,
                                     MASK)
    assert torch.equal(out, adv)


def _config(**algorithm_rc) -> Config:
    return Config.model_validate({"algorithm": {"rollout_correction": algorithm_rc}})


def test_defaults_are_verls_and_off():
    rc = Config().algorithm.rollout_correction
    assert (rc.rollout_is, rc.rollout_is_threshold, rc.rollout_rs, rc.rollout_rs_threshold, rc.bypass_mode) == (
        None, 2.0, None, None, False)
    assert not rollout_corr.enabled(rc)
    assert Config().actor_rollout_ref.rollout.calculate_log_probs is False
    rollout_corr.check_config(Config())


@pytest.mark.parametrize("settings, words", [
    ({"rollout_is": "token"}, "calculate_log_probs=true"),
    ({"rollout_rs": "token_k9", "rollout_rs_threshold": 2.0}, "token_k9"),
    ({"rollout_rs": "token_k1"}, "rollout_rs_threshold"),
    ({"rollout_rs": "token_k1", "rollout_rs_threshold": "2.0_0.5"}, "lower < upper"),
    ({"rollout_rs": "token_k3", "rollout_rs_threshold": "-1"}, "token_k3"),
    ({"rollout_is_threshold": 0.0}, "rollout_is_threshold=0.0"),
])
def test_unusable_settings_are_refused_naming_the_key(settings, words):
    cfg = _config(**settings)
    if settings.get("rollout_rs") or "rollout_is_threshold" in settings:
        cfg.actor_rollout_ref.rollout.calculate_log_probs = True
    with pytest.raises(ConfigError, match="algorithm.rollout_correction|calculate_log_probs") as err:
        rollout_corr.check_config(cfg)
    assert words in str(err.value)


def test_the_run_checks_refuse_a_correction_without_the_engines_log_probs():
    from stages.train.core_algos import check_algorithm_names

    with pytest.raises(ConfigError, match="calculate_log_probs=true"):
        check_algorithm_names(_config(bypass_mode=True))


def test_thresholds_without_their_correction_are_reported_inert():
    from config.inert import inert_keys

    assert not [m for m in inert_keys(Config()) if "rollout_correction" in m]
    cfg = _config(rollout_is_threshold=5.0, rollout_rs_threshold="0.5_2.0")
    found = [m for m in inert_keys(cfg) if "rollout_correction" in m]
    assert len(found) == 2 and "rollout_is is null" in found[0] and "rollout_rs is null" in found[1]
    assert not [m for m in inert_keys(_config(rollout_is="token", rollout_is_threshold=5.0,
                                              rollout_rs="token_k1", rollout_rs_threshold="0.5_2.0"))
                if "rollout_correction" in m]
