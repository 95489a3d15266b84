"""Policy losses, loss aggregation, the critic's value loss and the entropy bonus.

Shapes: B = responses in the batch, T = response tokens (right-padded), V = vocabulary.
`response_mask` / `loss_mask` is [B, T], 1 for a real response token and 0 for padding (float or bool).

Both registries are filled by decorators and read by name from the config:
- `actor_rollout_ref.actor.policy_loss.loss_mode` -> `POLICY_LOSSES` (`vanilla`, `gspo`)
- `actor_rollout_ref.actor.loss_agg_mode` / `critic.loss_agg_mode` -> `LOSS_AGG_MODES`
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from ground.errors import ConfigError
from ground.names import NameRegistry

if TYPE_CHECKING:  # the losses' `config` is actor_rollout_ref.actor.* of the run's config
    from config.schema import ActorConfig

# ------------------------------------------------------------------------------------------- masked helpers


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1. An all-zero mask gives 0 (not NaN)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise `x` to unit variance (and zero mean when `shift_mean`) over the masked positions.

    The variance is the unbiased one (Bessel's correction), as PPO implementations commonly use.
    """
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_sum((x - mean) ** 2, mask) / (n - 1).clamp(min=1.0)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


# ------------------------------------------------------------------------------------------- loss aggregation

LOSS_AGG_MODES: NameRegistry[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = NameRegistry(
    "loss aggregation mode")


def register_loss_agg_mode(name: str):
    """Register `fn(loss_mat [B,T], loss_mask [B,T]) -> scalar` as a loss aggregation mode."""
    return LOSS_AGG_MODES.register(name)


@register_loss_agg_mode("token-mean")
def _token_mean(loss_mat, loss_mask):
    """Mean over every response token in the batch: long answers weigh more (DAPO, arXiv:2503.14476)."""
    return masked_mean(loss_mat, loss_mask)


@register_loss_agg_mode("seq-mean-token-mean")
def _seq_mean_token_mean(loss_mat, loss_mask):
    """Mean over each response's tokens, then over responses (original GRPO, arXiv:2402.03300)."""
    mask = loss_mask.to(loss_mat.dtype)
    lengths = mask.sum(-1)
    per_seq = (loss_mat * mask).sum(-1) / lengths.clamp(min=1.0)
    # A response without a single loss token carries no signal; it must not dilute the mean either.
    has_tokens = (lengths > 0).to(loss_mat.dtype)
    return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)


@register_loss_agg_mode("seq-mean-token-sum")
def _seq_mean_token_sum(loss_mat, loss_mask):
    """Sum over each response's tokens, then mean over responses."""
    return masked_sum(loss_mat, loss_mask, dim=-1).mean()


@register_loss_agg_mode("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(loss_mat, loss_mask):
    """Token sum divided by the constant B*T, the batch's token budget (Dr. GRPO, arXiv:2503.20783)."""
    # A constant normaliser removes GRPO's length bias: no response's tokens weigh more for being short.
    return masked_sum(loss_mat, loss_mask) / loss_mask.numel()


def check_loss_agg_mode(mode: str, key: str = "actor_rollout_ref.actor.loss_agg_mode") -> None:
    LOSS_AGG_MODES.canonical(mode, key)


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str) -> torch.Tensor:
    """Reduce a per-token loss `loss_mat` [B,T] under `loss_mask` [B,T] to a scalar with the named mode.

    token-mean:              sum(L*M) / sum(M)
    seq-mean-token-mean:     mean_i [ sum_t(L*M)_i / sum_t(M)_i ]   (responses with no token are skipped)
    seq-mean-token-sum:      mean_i [ sum_t(L*M)_i ]
    seq-mean-token-sum-norm: sum(L*M) / (B*T)
    """
    check_loss_agg_mode(loss_agg_mode)
    return LOSS_AGG_MODES[loss_agg_mode](loss_mat, loss_mask)


# --------------------------------------------------------------------------------------------- policy losses

PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]
POLICY_LOSSES: NameRegistry[PolicyLossFn] = NameRegistry("policy loss")


def register_policy_loss(name: str):
    """Register `fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config) -> (loss, metrics)`."""

    return POLICY_LOSSES.register(name)


def get_policy_loss_fn(name: str) -> PolicyLossFn:
    return POLICY_LOSSES.lookup(name, "actor_rollout_ref.actor.policy_loss.loss_mode")


def clip_range(config: ActorConfig) -> tuple[float, float, float]:
    """(low, high, c) from an ActorConfig: clip_ratio_low/high default to clip_ratio; c is the dual-clip bound."""
    low = config.clip_ratio if config.clip_ratio_low is None else config.clip_ratio_low
    high = config.clip_ratio if config.clip_ratio_high is None else config.clip_ratio_high
    if not 0 <= low < 1 or high < 0:
        raise ConfigError(
            f"actor_rollout_ref.actor.clip_ratio_low={low} / clip_ratio_high={high}: the ratio is clipped to "
            "[1-low, 1+high], so low must be in [0, 1) and high >= 0 (PPO: 0.2/0.2, DAPO: 0.2/0.28)."
        )
    if config.clip_ratio_c <= 1:
        raise ConfigError(
            f"actor_rollout_ref.actor.clip_ratio_c={config.clip_ratio_c} must be > 1: dual-clip bounds the loss of a "
            "negative-advantage token at c*|A|, above the ordinary clip. The usual value is 3."
        )
    return low, high, config.clip_ratio_c


# exp() of a log-ratio this large already overflows float16/bfloat16 budgets; clamping keeps a stray token
# (e.g. a near-impossible sample under the old policy) from turning the whole loss into inf/NaN.
_MAX_LOG_RATIO = 20.0


@register_policy_loss("vanilla")
def vanilla_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config):
    """Clipped PPO surrogate with asymmetric clipping and dual-clip.

    PPO (arXiv:1707.06347): L = -min(r*A, clip(r, 1-low, 1+high)*A) with r = pi/pi_old per token.
    Separate low/high bounds ("clip-higher") are DAPO's (arXiv:2503.14476). Dual-clip (arXiv:1912.09729) further
    bounds the loss of tokens with A < 0 at -c*A, so a huge ratio on a bad token cannot dominate the update.

    Args: old_log_prob, log_prob, advantages, response_mask: [B,T]; config: ActorConfig.
    Returns: (scalar loss, {"pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"}) where pg_clipfrac is the share of
    tokens where the clip bound is active, pg_clipfrac_lower the share where dual-clip is active, and ppo_kl the
    mean of log(pi_old/pi) (k1 estimate of KL(pi_old || pi)).
    """
    low, high, clip_c = clip_range(config)
    log_ratio = torch.clamp(log_prob - old_log_prob, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)

    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    pessimistic = torch.maximum(unclipped, clipped)  # the min of the objective = the max of the loss
    dual_bound = -advantages * clip_c
    dual_clipped = torch.minimum(pessimistic, dual_bound)
    per_token = torch.where(advantages < 0, dual_clipped, pessimistic)

    loss = agg_loss(per_token, response_mask, loss_agg_mode)
    metrics = {
        "pg_clipfrac": masked_mean((clipped > unclipped).float(), response_mask).item(),
        "pg_clipfrac_lower": masked_mean(((pessimistic > dual_bound) & (advantages < 0)).float(), response_mask).item(),
        "ppo_kl": masked_mean(-log_ratio, response_mask).item(),
    }
    return loss, metrics


@register_policy_loss("gspo")
def gspo_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config):
    """GSPO: clip a sequence-level importance ratio instead of per-token ones (arXiv:2507.18071).

    s_i = exp( mean_t log(pi/pi_old)_{i,t} ), the length-normalised sequence ratio. Every token of response i
    gets the value s_i, while its gradient flows through its own log-prob:
        log r_{i,t} = sg[log s_i] + log pi_{i,t} - sg[log pi_{i,t}]
    (sg = stop-gradient), which is GSPO-token; with the same advantage on every token it equals GSPO.
    The paper's clip ranges are tiny (about 3e-4 / 4e-4) because s_i is a geometric mean; set
    clip_ratio_low/high accordingly. The paper aggregates with seq-mean-token-mean.

    Args/returns as `vanilla_policy_loss`; pg_clipfrac_lower is always 0 (no dual-clip here).
    """
    low, high, _ = clip_range(config)
    mask = response_mask.to(log_prob.dtype)
    token_log_ratio = log_prob - old_log_prob
    seq_log_ratio = masked_mean(token_log_ratio, mask, dim=-1)  # [B]
    log_ratio = seq_log_ratio.detach().unsqueeze(-1) + log_prob - log_prob.detach()
    ratio = torch.exp(torch.clamp(log_ratio, max=10.0))

    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    loss = agg_loss(per_token, response_mask, loss_agg_mode)
    metrics = {
        "pg_clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
        "pg_clipfrac_lower": 0.0,
        "ppo_kl": masked_mean(-token_log_ratio, mask).item(),
    }
    return loss, metrics


# -------------------------------------------------------------------------------------------- critic, entropy


def compute_value_loss(vpreds, returns, values, response_mask, cliprange_value: float, loss_agg_mode: str):
    """PPO's clipped value loss (arXiv:1707.06347, as in OpenAI baselines).

    The new prediction may move at most `cliprange_value` from the value at rollout time; the loss is the larger
    of the clipped and unclipped squared errors, halved.
    Args: vpreds (new values), returns, values (rollout-time values), response_mask: [B,T].
    Returns: (scalar loss, clipfrac: float share of tokens where the clipped error was the larger).
    """
    clipped_preds = values + torch.clamp(vpreds - values, -cliprange_value, cliprange_value)
    err_unclipped = (vpreds - returns) ** 2
    err_clipped = (clipped_preds - returns) ** 2
    loss = 0.5 * agg_loss(torch.maximum(err_unclipped, err_clipped), response_mask, loss_agg_mode)
    clipfrac = masked_mean((err_clipped > err_unclipped).float(), response_mask).item()
    return loss, clipfrac


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution of each position: logits [B,T,V] -> [B,T].

    H = logsumexp(z) - sum_v softmax(z)_v * z_v, which never forms log(softmax) and so stays finite.
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)
