"""Advantage estimators and DAPO's batch shaping, plus re-exports of the losses and KL pieces.

Shapes: B = responses in the batch, T = response tokens (right-padded), `response_mask` [B,T] is 1 on real tokens.
Every advantage estimator has the same signature, so the trainer calls whichever `algorithm.adv_estimator` names:

    fn(token_level_rewards [B,T], response_mask [B,T], index (len B group ids), config: AlgorithmConfig,
       values [B,T] | None = None, reward_baselines [B] | None = None) -> (advantages [B,T], returns [B,T])

`index` holds one hashable group id per response (the prompt's uid): responses to the same prompt form a group.
Outcome rewards sit on the last response token, so a response's score is `token_level_rewards.sum(-1)`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Callable, Optional

import torch

from ground.errors import ConfigError
from ground.names import NameRegistry
from stages.train.kl import (  # noqa: F401  (re-exported: one import site for the trainer)
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    apply_kl_penalty,
    check_kl_kind,
    kl_penalty,
    make_kl_controller,
    register_kl_estimator,
)
from stages.train.losses import (  # noqa: F401
    LOSS_AGG_MODES,
    POLICY_LOSSES,
    agg_loss,
    check_loss_agg_mode,
    compute_value_loss,
    entropy_from_logits,
    get_policy_loss_fn,
    masked_mean,
    masked_whiten,
    register_loss_agg_mode,
    register_policy_loss,
)

if TYPE_CHECKING:  # the estimators' `config` is algorithm.* of the run's config
    from config.schema import AlgorithmConfig

AdvEstimatorFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
ADV_ESTIMATORS: NameRegistry[AdvEstimatorFn] = NameRegistry("advantage estimator")
_NEEDS_CRITIC: set[str] = set()
_NEEDS_GREEDY_BASELINE: set[str] = set()

# Algorithm recipe names (the seed's `algorithm.adv_estimator` values) -> the estimator they use.
# The rest of a recipe (DAPO's clip-higher, dynamic sampling, ...) is config defaults: config.loader presets.
RECIPE_ESTIMATORS = {"ppo": "gae", "dapo": "grpo"}

_EPS = 1e-6


def register_adv_estimator(name: str, needs_critic: bool = False, needs_greedy_baseline: bool = False):
    """Register an advantage estimator under `name` (see the module docstring for the signature)."""

    def wrap(fn):
        ADV_ESTIMATORS.add(name, fn)
        if needs_critic:
            _NEEDS_CRITIC.add(name)
        if needs_greedy_baseline:
            _NEEDS_GREEDY_BASELINE.add(name)
        return fn

    return wrap


def resolve_adv_estimator_name(name: str) -> str:
    """`ppo` -> `gae`, `dapo` -> `grpo`; a registered name maps to itself; anything else is a ConfigError."""
    if name in RECIPE_ESTIMATORS:
        return RECIPE_ESTIMATORS[name]
    recipes = tuple(f"{k} (= {v})" for k, v in RECIPE_ESTIMATORS.items())
    return ADV_ESTIMATORS.canonical(name, "algorithm.adv_estimator", extra_valid=recipes)


def get_adv_estimator(name: str) -> AdvEstimatorFn:
    return ADV_ESTIMATORS[resolve_adv_estimator_name(name)]


def needs_critic(name: str) -> bool:
    """True when the estimator needs a value model (PPO's GAE)."""
    return resolve_adv_estimator_name(name) in _NEEDS_CRITIC


def needs_greedy_baseline(name: str) -> bool:
    """True when the estimator needs `reward_baselines`: the reward of a greedy rollout per prompt (ReMax)."""
    return resolve_adv_estimator_name(name) in _NEEDS_GREEDY_BASELINE


# -------------------------------------------------------------------------------------------------- groups


def group_ids(index: Sequence[Hashable]) -> tuple[torch.Tensor, int]:
    """Map group ids (any hashables) to 0..G-1 in order of first appearance: ([B] long tensor, G)."""
    ids: dict[Hashable, int] = {}
    out = [ids.setdefault(key, len(ids)) for key in index]
    return torch.tensor(out, dtype=torch.long), len(ids)


def group_stats(scores: torch.Tensor, index: Sequence[Hashable]):
    """Per-response (group mean, group unbiased std, group size), each [B], for scores [B]."""
    gid, n_groups = group_ids(index)
    if len(gid) != scores.shape[0]:
        raise ValueError(f"index has {len(gid)} group ids for {scores.shape[0]} responses")
    gid = gid.to(scores.device)
    zeros = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device)
    size = zeros.index_add(0, gid, torch.ones_like(scores))
    mean = zeros.index_add(0, gid, scores) / size
    sq_dev = zeros.index_add(0, gid, (scores - mean[gid]) ** 2)
    std = torch.sqrt(sq_dev / (size - 1).clamp(min=1.0))
    return mean[gid], std[gid], size[gid]


def _check_shapes(token_level_rewards, response_mask, index):
    if token_level_rewards.shape != response_mask.shape:
        raise ValueError(f"rewards {tuple(token_level_rewards.shape)} and mask {tuple(response_mask.shape)} differ")
    if index is not None and len(index) != token_level_rewards.shape[0]:
        raise ValueError(f"index has {len(index)} entries for {token_level_rewards.shape[0]} responses")


# ---------------------------------------------------------------------------------------------- estimators


@register_adv_estimator("gae", needs_critic=True)
def compute_gae_advantage(token_level_rewards, response_mask, index, config: AlgorithmConfig, values=None,
                          reward_baselines=None):
    """Generalised Advantage Estimation for PPO with a critic (arXiv:1506.02438; PPO arXiv:1707.06347).

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1},  returns = A + V,
    then advantages are whitened over the batch's response tokens. Masked positions are skipped: the recursion
    carries V_{t+1} and A_{t+1} across them, so the value after a response's last token is 0.
    Needs `values` [B,T] (the critic's values at rollout time). Uses config.gamma, config.lam.
    """
    _check_shapes(token_level_rewards, response_mask, index)
    if values is None:
        raise ValueError("the gae estimator needs the critic's values")
    gamma, lam = config.gamma, config.lam
    mask = response_mask.to(token_level_rewards.dtype)
    n_tokens = token_level_rewards.shape[-1]
    next_value = torch.zeros_like(token_level_rewards[:, 0])
    next_adv = torch.zeros_like(next_value)
    advantages = torch.zeros_like(token_level_rewards)
    with torch.no_grad():
        for t in reversed(range(n_tokens)):
            m = mask[:, t]
            delta = token_level_rewards[:, t] + gamma * next_value - values[:, t]
            adv = delta + gamma * lam * next_adv
            # On a masked position keep the carried quantities unchanged.
            next_adv = m * adv + (1 - m) * next_adv
            next_value = m * values[:, t] + (1 - m) * next_value
            advantages[:, t] = next_adv
        returns = (advantages + values) * mask
        advantages = masked_whiten(advantages, mask) * mask
    return advantages, returns


@register_adv_estimator("grpo")
def compute_grpo_advantage(token_level_rewards, response_mask, index, config: AlgorithmConfig, values=None,
                           reward_baselines=None):
    """GRPO's group-relative outcome advantage (arXiv:2402.03300).

    A_i = (s_i - mean(group)) / (std(group) + eps), the same on every token of response i (s_i = summed reward,
    std unbiased). With config.norm_adv_by_std_in_grpo=False the std division is dropped: Dr. GRPO
    (arXiv:2503.20783), which argues it over-weights questions that are too easy or too hard.
    A group of one response has no baseline; its advantage is its score (mean 0, std 1), as in verl.
    returns = advantages.
    """
    _check_shapes(token_level_rewards, response_mask, index)
    mask = response_mask.to(token_level_rewards.dtype)
    scores = token_level_rewards.sum(-1)
    mean, std, size = group_stats(scores, index)
    single = size < 2
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    adv = scores - mean
    if config.norm_adv_by_std_in_grpo:
        adv = adv / (std + _EPS)
    advantages = adv.unsqueeze(-1) * mask
    return advantages, advantages


@register_adv_estimator("rloo")
def compute_rloo_advantage(token_level_rewards, response_mask, index, config, values=None, reward_baselines=None):
    """REINFORCE Leave-One-Out (arXiv:2402.14740): baseline = mean score of the other responses of the prompt.

    A_i = s_i - (sum_group - s_i) / (G - 1) = G/(G-1) * (s_i - mean(group)). A group of one gets A_i = s_i.
    returns = advantages.
    """
    _check_shapes(token_level_rewards, response_mask, index)
    mask = response_mask.to(token_level_rewards.dtype)
    scores = token_level_rewards.sum(-1)
    mean, _, size = group_stats(scores, index)
    others_mean = (mean * size - scores) / (size - 1).clamp(min=1.0)
    baseline = torch.where(size < 2, torch.zeros_like(scores), others_mean)
    advantages = (scores - baseline).unsqueeze(-1) * mask
    return advantages, advantages


def _discounted_returns(token_level_rewards, mask, gamma):
    """G_t = r_t + gamma * G_{t+1} over each response's model tokens: a masked position (padding, or a tool's
    tokens inside a multi-turn response) carries the sum through unchanged, so a reward after a tool turn still
    reaches the tokens before it, discounted by model tokens only."""
    returns = torch.zeros_like(token_level_rewards)
    running = torch.zeros_like(token_level_rewards[:, 0])
    for t in reversed(range(token_level_rewards.shape[-1])):
        m = mask[:, t]
        running = m * (token_level_rewards[:, t] + gamma * running) + (1 - m) * running
        returns[:, t] = running
    return returns


@register_adv_estimator("reinforce_plus_plus")
def compute_reinforce_plus_plus_advantage(token_level_rewards, response_mask, index, config, values=None,
                                          reward_baselines=None):
    """REINFORCE++ (arXiv:2501.03262): discounted token returns, whitened over the whole batch.

    Token rewards may include the per-token KL penalty (algorithm.use_kl_in_reward); G_t = sum_k gamma^k r_{t+k}
    (config.gamma); advantages = whiten(G) over response tokens. No critic, no groups. returns = G.
    """
    _check_shapes(token_level_rewards, response_mask, index)
    mask = response_mask.to(token_level_rewards.dtype)
    with torch.no_grad():
        returns = _discounted_returns(token_level_rewards * mask, mask, config.gamma) * mask
        advantages = masked_whiten(returns, mask) * mask
    return advantages, returns


@register_adv_estimator("reinforce_plus_plus_baseline")
def compute_reinforce_plus_plus_baseline_advantage(token_level_rewards, response_mask, index, config, values=None,
                                                   reward_baselines=None):
    """REINFORCE++-baseline (arXiv:2501.03262): subtract the group mean score, then whiten over the batch.

    A = whiten_batch((s_i - mean(group)) on every token of response i). Subtracting the group mean removes the
    prompt's difficulty; the batch-wide whitening (not per group, unlike GRPO) keeps the scale stable.
    A group of one keeps its score (mean 0). returns = advantages.
    """
    _check_shapes(token_level_rewards, response_mask, index)
    mask = response_mask.to(token_level_rewards.dtype)
    scores = token_level_rewards.sum(-1)
    mean, _, size = group_stats(scores, index)
    centred = scores - torch.where(size < 2, torch.zeros_like(mean), mean)
    advantages = masked_whiten(centred.unsqueeze(-1) * mask, mask) * mask
    return advantages, advantages


@register_adv_estimator("remax", needs_greedy_baseline=True)
def compute_remax_advantage(token_level_rewards, response_mask, index, config, values=None, reward_baselines=None):
    """ReMax (arXiv:2310.10505): REINFORCE with the reward of the greedy response to the same prompt as baseline.

    returns_t = sum_{k>=t} r_k (undiscounted reward-to-go); A_t = returns_t - b_i with b_i = reward_baselines[i].
    Needs reward_baselines [B]: the trainer generates one greedy response per prompt and scores it.
    """
    _check_shapes(token_level_rewards, response_mask, index)
    if reward_baselines is None:
        raise ValueError("the remax estimator needs reward_baselines (the greedy responses' rewards)")
    mask = response_mask.to(token_level_rewards.dtype)
    with torch.no_grad():
        returns = _discounted_returns(token_level_rewards * mask, mask, 1.0) * mask
        advantages = (returns - reward_baselines.to(returns.dtype).unsqueeze(-1)) * mask
    return advantages, returns


# ----------------------------------------------------------------------------------------- DAPO batch shaping


def dynamic_sampling_keep(index: Sequence[Hashable], metric_values) -> torch.Tensor:
    """DAPO's dynamic sampling filter (arXiv:2503.14476): a [B] bool mask keeping groups whose values differ.

    A group whose responses all score the same (all right or all wrong) has zero GRPO advantage and so no
    gradient; dropping it keeps every trained group informative. A group of one response is kept (there is
    nothing to compare it with, and with rollout.n=1 the filter would otherwise drop everything).
    metric_values: [B] numbers (e.g. each response's `acc` or score), aligned with `index`.
    """
    if any(v is None for v in metric_values):
        raise ValueError("dynamic_sampling_keep got None metric values (a scorer without `acc`?); pass scores instead")
    values = torch.as_tensor(metric_values, dtype=torch.float64).flatten()
    if values.shape[0] != len(index):
        raise ValueError(f"{values.shape[0]} metric values for {len(index)} group ids")
    gid, n_groups = group_ids(index)
    lowest = torch.full((n_groups,), float("inf"), dtype=torch.float64).scatter_reduce(0, gid, values, "amin")
    highest = torch.full((n_groups,), float("-inf"), dtype=torch.float64).scatter_reduce(0, gid, values, "amax")
    size = torch.zeros(n_groups).index_add(0, gid, torch.ones(len(gid)))
    keep_group = (highest > lowest) | (size < 2)
    return keep_group[gid]


def overlong_penalty(response_lengths, max_response_length: int, buffer_len: int, penalty_factor: float):
    """DAPO's soft overlong punishment (arXiv:2503.14476): a [B] reward term, 0 or negative.

    With L = max_response_length and the buffer's first length L - buffer_len:
        0                                                     if len <= L - buffer_len
        -penalty_factor * (len - (L - buffer_len)) / buffer_len   inside the buffer (linear down to -factor at L)
    clamped at -penalty_factor. It tells the model that running out of budget is bad, gradually, instead of the
    noise a hard cut-off gives to otherwise good reasoning.
    """
    if not 0 < buffer_len <= max_response_length:
        raise ConfigError(
            f"reward_model.overlong_buffer.len={buffer_len} must be in (0, data.max_response_length="
            f"{max_response_length}]: it is the number of final tokens of the budget over which the penalty grows."
        )
    lengths = torch.as_tensor(response_lengths, dtype=torch.float32)
    start = max_response_length - buffer_len
    penalty = -penalty_factor * (lengths - start) / buffer_len
    return torch.clamp(penalty, min=-penalty_factor, max=0.0)


# ------------------------------------------------------------------------------------------- config checking


def check_algorithm_names(cfg) -> None:
    """Check every registry-backed name of a Config; a ConfigError names the key and the valid values."""
    resolve_adv_estimator_name(cfg.algorithm.adv_estimator)
    actor = cfg.actor_rollout_ref.actor
    get_policy_loss_fn(actor.policy_loss.loss_mode)
    check_loss_agg_mode(actor.loss_agg_mode, "actor_rollout_ref.actor.loss_agg_mode")
    check_loss_agg_mode(cfg.critic.loss_agg_mode, "critic.loss_agg_mode")
    check_kl_kind(actor.kl_loss_type, "actor_rollout_ref.actor.kl_loss_type")
    check_kl_kind(cfg.algorithm.kl_penalty, "algorithm.kl_penalty")
    from stages.train import rollout_corr

    rollout_corr.check_config(cfg)
    from stages.train import agent_loops

    agent_loops.check_config(cfg)  # the default agent loop's name, the tool YAML
    if cfg.reward_model.scorer and not cfg.custom_reward_function.path:
        from stages.train.rewards import REWARD_SCORERS

        REWARD_SCORERS.canonical(cfg.reward_model.scorer, "reward_model.scorer")


def describe(fn: Optional[Callable]) -> str:
    """The first sentence of a registered function's docstring (for `pipeline algorithms`)."""
    doc = (fn.__doc__ or "").strip().splitlines()
    return doc[0].strip() if doc else ""
