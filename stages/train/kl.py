"""KL estimators between the policy and the reference model, and the KL coefficient controllers.

The estimators follow J. Schulman, "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html).
With x ~ pi (the policy that sampled the response) and log r = log pi_ref(x) - log pi(x), each estimator is a
per-token sample whose expectation is (or approximates) KL(pi || pi_ref):
    k1 = -log r            unbiased, high variance, can be negative
    k2 = (log r)^2 / 2     biased, low variance, never negative
    k3 = (r - 1) - log r   unbiased, low variance, never negative
KL enters training in one of two ways:
- as a loss term (`actor.use_kl_loss`, `kl_loss_coef`, `kl_loss_type`), or
- subtracted from the reward (`algorithm.use_kl_in_reward`, `algorithm.kl_penalty`, `algorithm.kl_ctrl`).
"""

from __future__ import annotations

from typing import Callable

import torch

from ground.errors import ConfigError
from ground.names import NameRegistry
from stages.train.losses import masked_mean

KL_ESTIMATORS: NameRegistry[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = NameRegistry("KL estimator")


def register_kl_estimator(name: str, aliases: tuple[str, ...] = ()):
    """Register `fn(log_prob [B,T], ref_log_prob [B,T]) -> [B,T]` under `name` and its aliases."""

    return KL_ESTIMATORS.register(name, aliases)


@register_kl_estimator("k1", aliases=("kl",))
def kl_k1(log_prob, ref_log_prob):
    """k1 = log pi - log pi_ref: unbiased, but a single sample can be negative."""
    return log_prob - ref_log_prob


@register_kl_estimator("abs")
def kl_abs(log_prob, ref_log_prob):
    """|log pi - log pi_ref|: a non-negative, biased variant of k1."""
    return (log_prob - ref_log_prob).abs()


@register_kl_estimator("k2", aliases=("mse",))
def kl_k2(log_prob, ref_log_prob):
    """k2 = (log pi - log pi_ref)^2 / 2: biased, low variance; its gradient is the true KL gradient's sample."""
    return 0.5 * (log_prob - ref_log_prob).square()


# Bounds for k3. exp(log r) explodes when the reference finds a sampled token far less likely than the policy
# does (log r << 0 gives r ~ 0, fine; log r >> 0 gives r = e^20+), and one such token would then swamp the
# whole batch's loss or reward. Clamping log r before exp() and k3 afterwards keeps values and gradients
# finite; the estimate is biased only on those outlier tokens. (verl clamps k3 the same way.)
_K3_LOG_RATIO_BOUND = 20.0
_K3_VALUE_BOUND = 10.0


@register_kl_estimator("k3", aliases=("low_var_kl",))
def kl_k3(log_prob, ref_log_prob):
    """k3 = (r - 1) - log r with r = pi_ref/pi: unbiased, low variance, never negative (e^x >= 1 + x).

    Clamped to [0, 10] (log r to +-20 first) so a single outlier token cannot produce inf/NaN.
    """
    log_r = torch.clamp(ref_log_prob - log_prob, -_K3_LOG_RATIO_BOUND, _K3_LOG_RATIO_BOUND)
    k3 = torch.exp(log_r) - 1.0 - log_r
    return torch.clamp(k3, min=0.0, max=_K3_VALUE_BOUND)


@register_kl_estimator("k3+", aliases=("low_var_kl+",))
def kl_k3_plus(log_prob, ref_log_prob):
    """k3's value with k2's gradient (straight-through): `k2 - sg[k2] + sg[k3]`.

    Why: as a loss, the gradient of k3 w.r.t. the policy is (1 - r) * grad log pi, whose expectation under pi is
    the gradient of KL(pi_ref || pi), the reverse direction. The gradient of k2, (log pi - log pi_ref) *
    grad log pi, is in expectation the gradient of KL(pi || pi_ref), the one we mean to penalise. (k1's own
    gradient, grad log pi, has expectation zero and would penalise nothing.) So k3+ reports k3 and trains on k2's
    gradient.
    """
    k2 = kl_k2(log_prob, ref_log_prob)
    return k2 - k2.detach() + kl_k3(log_prob, ref_log_prob).detach()


def check_kl_kind(kind: str, key: str) -> str:
    """Return the canonical estimator name or raise ConfigError naming the config key."""
    return KL_ESTIMATORS.canonical(kind, key)


def kl_penalty(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL estimate [B,T] of the named kind (see `KL_ESTIMATORS`); not masked."""
    check_kl_kind(kind, "kl estimator")
    return KL_ESTIMATORS[kind](log_prob, ref_log_prob)


# ---------------------------------------------------------------------------------------------- controllers


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Adapts the coefficient so the measured KL tracks `target_kl` (Ziegler et al. 2019, arXiv:1909.08593).

    beta <- beta * (1 + clip(KL/target - 1, -0.2, 0.2) * n_steps / horizon): a proportional controller whose
    error is clipped so a single odd batch cannot swing the coefficient.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int):
        if target_kl <= 0 or horizon <= 0:
            raise ConfigError(
                f"algorithm.kl_ctrl: the adaptive controller needs target_kl > 0 and horizon > 0 "
                f"(got target_kl={target_kl}, horizon={horizon})."
            )
        self.value = float(init_kl_coef)
        self.target = float(target_kl)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def make_kl_controller(kl_ctrl_cfg) -> FixedKLController | AdaptiveKLController:
    """Build the controller named by `algorithm.kl_ctrl.type` (a KLControlConfig)."""
    if kl_ctrl_cfg.type == "fixed":
        return FixedKLController(kl_ctrl_cfg.kl_coef)
    if kl_ctrl_cfg.type == "adaptive":
        return AdaptiveKLController(kl_ctrl_cfg.kl_coef, kl_ctrl_cfg.target_kl, kl_ctrl_cfg.horizon)
    raise ConfigError(f"algorithm.kl_ctrl.type={kl_ctrl_cfg.type!r}; valid: fixed, adaptive.")


def apply_kl_penalty(token_level_scores, log_prob, ref_log_prob, response_mask, kl_ctrl, kind: str):
    """Subtract beta * KL from the per-token scores, then let the controller see this batch's KL.

    Args: token_level_scores, log_prob, ref_log_prob, response_mask: [B,T]; kl_ctrl: a controller; kind: estimator.
    Returns: (token_level_rewards [B,T], {"actor/reward_kl_penalty": mean KL per response,
              "actor/reward_kl_penalty_coeff": beta used}).
    """
    mask = response_mask.to(token_level_scores.dtype)
    kld = kl_penalty(log_prob, ref_log_prob, kind) * mask
    beta = kl_ctrl.value
    rewards = token_level_scores - beta * kld
    # Mean over each response's tokens, then over responses: the KL "per token" the controller targets.
    current_kl = masked_mean(kld, mask, dim=-1).mean().item()
    kl_ctrl.update(current_kl, n_steps=token_level_scores.shape[0])
    return rewards, {"actor/reward_kl_penalty": current_kl, "actor/reward_kl_penalty_coeff": beta}
