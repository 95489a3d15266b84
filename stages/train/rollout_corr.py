"""Rollout correction: the engine that sampled the tokens is not exactly the policy being trained.

vLLM samples with its own kernels (and the demo samples in bf16 while the actor computes in float32), so the
probability a token was sampled with, pi_rollout, differs from the actor's pi_old for the same weights. verl's
`algorithm.rollout_correction` (same key names and defaults here) measures that gap and corrects for it:

- truncated importance sampling (`rollout_is`): weight each token's policy-gradient term by
  w = min(pi_old / pi_rollout, rollout_is_threshold), per token (`token`) or one product per response
  (`sequence`). Weights are constants (no gradient flows through them).
- rejection sampling (`rollout_rs`): drop tokens (token_*) or whole responses (seq_*) whose divergence statistic
  leaves the bounds in `rollout_rs_threshold`. k1 = log r with ratio bounds `lower_upper` (a single value U
  means 1/U_U); k2 = (log r)^2 / 2 and k3 = r - 1 - log r with an upper bound only.
- bypass_mode: the rollout's log-probs *are* the old log-probs (two policies instead of three): the separate
  old-log-prob pass is skipped and the PPO ratio itself corrects the mismatch, so no IS weight is applied.

Shapes: [B, T] per-token tensors, `mask` 1 on real response tokens.
"""

from __future__ import annotations

import math

import torch

from ground.errors import ConfigError

IS_LEVELS = ("token", "sequence")
RS_OPTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
              "seq_mean_k1", "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")
# exp() of a larger log-ratio overflows float32 on a sequence sum; one absurd token must not make inf weights.
_MAX_LOG_RATIO = 20.0


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


# ------------------------------------------------------------------------------------------------- config
def enabled(rc) -> bool:
    """Whether `algorithm.rollout_correction` changes the update (otherwise it only measures)."""
    return rc.rollout_is is not None or rc.rollout_rs is not None or rc.bypass_mode


def rs_bounds(rollout_rs: str, threshold) -> list[tuple[str, float | None, float]]:
    """`rollout_rs` (comma-separated options) + `rollout_rs_threshold` -> [(option, lower, upper)].

    One threshold serves every option, or one per option (comma-separated). k1 bounds are log-ratio bounds
    (log lower, log upper); k2/k3 have an upper bound only (lower None).
    """
    key = "algorithm.rollout_correction.rollout_rs"
    options = list(dict.fromkeys(o.strip() for o in str(rollout_rs).split(",") if o.strip()))
    unknown = [o for o in options if o not in RS_OPTIONS]
    if not options or unknown:
        raise ConfigError(f"{key}={rollout_rs!r}: {unknown or 'no option'} is not one of {', '.join(RS_OPTIONS)}. "
                          f"Set e.g. {key}=token_k1 (or null to turn rejection sampling off).")
    if threshold is None:
        raise ConfigError(f"{key}={rollout_rs!r} needs algorithm.rollout_correction.rollout_rs_threshold, e.g. "
                          "0.5_2.0 for a k1 option (ratio bounds) or 0.01 for k2/k3 (an upper bound).")
    specs = [s.strip() for s in str(threshold).split(",") if s.strip()]
    if len(specs) == 1:
        specs = specs * len(options)
    if len(specs) != len(options):
        raise ConfigError(f"algorithm.rollout_correction.rollout_rs_threshold={threshold!r} gives {len(specs)} "
                          f"thresholds for {len(options)} rollout_rs options; give one, or one per option.")
    bounds = []
    for option, spec in zip(options, specs):
        try:
            if option.endswith("k1"):
                lower, upper = (float(x) for x in spec.split("_", 1)) if "_" in spec else (1 / float(spec),
                                                                                          float(spec))
                if lower <= 0 or upper <= lower:
                    raise ValueError
                bounds.append((option, math.log(lower), math.log(upper)))
            else:
                upper = float(spec)
                if upper <= 0:
                    raise ValueError
                bounds.append((option, None, upper))
        except ValueError:
            raise ConfigError(
                f"algorithm.rollout_correction.rollout_rs_threshold={threshold!r}: {spec!r} is not a valid bound "
                f"for {option}. k1 options take ratio bounds `lower_upper` with 0 < lower < upper (e.g. 0.5_2.0) "
                "or one ratio U > 1 (meaning 1/U_U); k2/k3 options take one positive upper bound."
            ) from None
    return bounds


def check_config(cfg) -> None:
    """Refuse settings that cannot run, naming the key (called when the trainer starts)."""
    rc = cfg.algorithm.rollout_correction
    if rc.rollout_is_threshold <= 0:
        raise ConfigError(f"algorithm.rollout_correction.rollout_is_threshold={rc.rollout_is_threshold} must be "
                          "> 0 (the cap on an importance weight; verl's default is 2.0).")
    if rc.rollout_rs is not None:
        rs_bounds(rc.rollout_rs, rc.rollout_rs_threshold)
    if enabled(rc) and not cfg.actor_rollout_ref.rollout.calculate_log_probs:
        raise ConfigError(
            "algorithm.rollout_correction is on (rollout_is / rollout_rs / bypass_mode) but "
            "actor_rollout_ref.rollout.calculate_log_probs=false, so the engine's log-probs are not kept. "
            "Set actor_rollout_ref.rollout.calculate_log_probs=true."
        )


# ------------------------------------------------------------------------------------------------- maths
def is_weights(log_ratio: torch.Tensor, mask: torch.Tensor, level: str, threshold: float) -> torch.Tensor:
    """Truncated importance weights [B, T]: exp(log r) per token, or exp(sum_t log r) per response on each of
    its tokens, capped at `threshold`; 0 on padding; detached."""
    mask = mask.to(log_ratio.dtype)
    if level == "token":
        raw = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    elif level == "sequence":
        seq = (log_ratio * mask).sum(-1, keepdim=True).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        raw = torch.exp(seq).expand_as(log_ratio)
    else:
        raise ConfigError(f"algorithm.rollout_correction.rollout_is={level!r} is not one of token, sequence, "
                          "null.")
    return (raw.clamp(max=threshold) * mask).detach()


def rejection_mask(log_ratio: torch.Tensor, mask: torch.Tensor, rollout_rs: str, threshold) -> torch.Tensor:
    """[B, T] of 1 (kept) / 0 (rejected or padding): every option in `rollout_rs` must accept a token."""
    mask = mask.to(log_ratio.dtype)
    lr = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    per_token = {"k1": lr, "k2": 0.5 * lr**2, "k3": torch.exp(lr) - 1.0 - lr}
    keep = mask.clone()
    for option, lower, upper in rs_bounds(rollout_rs, threshold):
        level, _, estimator = option.rpartition("_")
        stat = per_token[estimator]
        if level == "seq_sum":
            stat = (stat * mask).sum(-1, keepdim=True)
        elif level == "seq_mean":
            stat = _masked_mean(stat, mask, dim=-1).unsqueeze(-1)
        elif level == "seq_max":
            stat = stat.masked_fill(mask == 0, float("-inf")).max(-1, keepdim=True).values
        ok = stat <= upper
        if lower is not None:
            ok = ok & (stat >= lower)
        keep = keep * ok.to(keep.dtype).expand_as(keep)
    return keep


def mismatch_metrics(train_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, mask: torch.Tensor) -> dict:
    """verl's rollout_corr/ metrics of how far the engine's distribution is from the actor's (0 when equal).

    kl: mean(log pi_rollout - log pi_train); k3_kl: mean(r - 1 - log r) with r = pi_train / pi_rollout (>= 0);
    log_ppl_abs_diff: mean over responses of |mean_t log pi_rollout - mean_t log pi_train|;
    chi2_token: mean(r^2) - 1; rollout_is_mean: mean(r), the untruncated token weight.
    """
    mask = mask.to(train_log_prob.dtype)
    if mask.sum() == 0:
        return {}
    log_r = (train_log_prob - rollout_log_prob).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    r = torch.exp(log_r)
    has_tokens = mask.sum(-1) > 0
    per_response = (_masked_mean(rollout_log_prob, mask, -1) - _masked_mean(train_log_prob, mask, -1))[has_tokens]
    return {
        "rollout_corr/kl": _masked_mean(-log_r, mask).item(),
        "rollout_corr/k3_kl": _masked_mean(r - 1.0 - log_r, mask).item(),
        "rollout_corr/log_ppl_abs_diff": per_response.abs().mean().item(),
        "rollout_corr/chi2_token": (_masked_mean(r * r, mask) - 1.0).item(),
        "rollout_corr/rollout_is_mean": _masked_mean(r, mask).item(),
    }


def correct(rc, train_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, advantages: torch.Tensor,
            mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(advantages, mask, metrics) for one micro-batch under `rc` = algorithm.rollout_correction.

    The IS weight scales the advantage rather than the loss: every policy loss here (PPO clip with dual-clip,
    GSPO) is -A times a function of the ratio, positively homogeneous in A, so w*A gives w times the per-token
    loss, for every advantage estimator alike. Rejected tokens leave the mask, so they leave every loss term.
    """
    train_log_prob = train_log_prob.detach()
    metrics = mismatch_metrics(train_log_prob, rollout_log_prob, mask)
    log_ratio = train_log_prob - rollout_log_prob
    if rc.rollout_rs is not None:
        keep = rejection_mask(log_ratio, mask, rc.rollout_rs, rc.rollout_rs_threshold)
        if mask.sum() > 0:
            metrics["rollout_corr/rollout_rs_masked_fraction"] = (1.0 - keep.sum() / mask.to(keep.dtype).sum()).item()
        mask = keep.to(mask.dtype)
    if rc.rollout_is is not None and not rc.bypass_mode:
        weights = is_weights(log_ratio, mask, rc.rollout_is, rc.rollout_is_threshold)
        advantages = advantages * weights
        metrics["rollout_corr/rollout_is_weight_mean"] = _masked_mean(weights, mask).item() if mask.sum() else 0.0
    return advantages, mask, metrics
