"""PPO's clipped policy and value losses over response tokens (Schulman et al. 2017, Eq. 7/9).

Both are token means over the mask (every response token weighs the same, as in TRL and
lm-human-preferences) and return ``(loss, stats)``; the stats are detached 0-dim tensors
(call ``.item()`` when logging, so a GPU run syncs once per log, not per step).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_core.rl._checks import as_bool_mask, require_same_shape
from rlhf_core.rl.masked import masked_mean


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate objective, negated to a loss (Schulman et al. 2017, Eq. 7).

    ``ρ_t = exp(log π_θ(a_t) − log π_old(a_t))``,
    ``L = mean_t max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε))`` over unmasked tokens.

    Args:
        logprobs: (B, T) log-probs of the sampled tokens under the current policy (with grad).
        old_logprobs: (B, T) the same at rollout time (no grad).
        advantages: (B, T) advantages, usually whitened (no grad).
        mask: (B, T) 1/True on response tokens.
        clip_range: ε > 0.

    Returns:
        ``(loss, stats)``: a 0-dim loss and detached scalars ``approxkl``
        (½·mean((log π − log π_old)²), PPO2's estimate), ``clipfrac`` (share of tokens
        where the clipped branch is the active one) and ``ratio_mean`` (mean ρ).
    """
    require_same_shape(
        "ppo_policy_loss",
        logprobs=logprobs,
        old_logprobs=old_logprobs,
        advantages=advantages,
        mask=mask,
    )
    if clip_range <= 0:
        raise ValueError(f"ppo_policy_loss: clip_range must be > 0, got {clip_range}")
    m = as_bool_mask(mask)
    # Zero the padding's log-ratio before exp: garbage log-probs there must not overflow.
    log_ratio = torch.where(m, logprobs - old_logprobs, 0.0)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # (B, T)
    loss = masked_mean(torch.max(unclipped, clipped), m)
    with torch.no_grad():
        stats = {
            "approxkl": 0.5 * masked_mean(log_ratio**2, m),
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), m),
            "ratio_mean": masked_mean(ratio, m),
        }
    return loss, stats


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range_value: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (PPO2's; Huang et al. 2024, detail "value function clipping").

    ``V_clip = V_old + clip(V − V_old, −ε_v, ε_v)``,
    ``L = ½·mean_t max((V_t − R_t)², (V_clip,t − R_t)²)`` over unmasked tokens.

    Args:
        values: (B, T) current value-head outputs (with grad).
        old_values: (B, T) value-head outputs at rollout time (no grad).
        returns: (B, T) targets R_t from ``compute_gae`` (no grad).
        mask: (B, T) 1/True on response tokens.
        clip_range_value: ε_v > 0.

    Returns:
        ``(loss, stats)``: a 0-dim loss and detached scalars ``vpred`` (mean value),
        ``clipfrac`` (share of tokens where the clipped error is the larger one) and
        ``error`` (mean squared error (V − R)², unclipped).
    """
    require_same_shape(
        "ppo_value_loss", values=values, old_values=old_values, returns=returns, mask=mask
    )
    if clip_range_value <= 0:
        raise ValueError(f"ppo_value_loss: clip_range_value must be > 0, got {clip_range_value}")
    m = as_bool_mask(mask)
    values_clipped = old_values + torch.clamp(
        values - old_values, -clip_range_value, clip_range_value
    )  # (B, T)
    err_unclipped = (values - returns) ** 2  # (B, T)
    err_clipped = (values_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.max(err_unclipped, err_clipped), m)
    with torch.no_grad():
        stats = {
            "vpred": masked_mean(values, m),
            "clipfrac": masked_mean((err_clipped > err_unclipped).to(values.dtype), m),
            "error": masked_mean(err_unclipped, m),
        }
    return loss, stats
