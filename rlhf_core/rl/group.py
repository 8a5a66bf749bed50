"""Critic-free policy gradients on groups of samples: GRPO and RLOO advantages, GRPO's clipped loss.

Each prompt is sampled ``k`` times and the group's own rewards stand in for a value function.
Groups are consecutive rows: rows ``g·k … g·k + k − 1`` are the ``k`` completions of prompt
``g`` (the order TRL's ``RepeatSampler`` produces). Shapes: B = G·k sequences of T tokens;
``mask`` (B, T) is 1 on completion tokens.

Implementation details (matching TRL 1.16's ``GRPOTrainer``/``RLOOTrainer``):

1. GRPO advantage ``(r − mean_g) / (std + 1e-4)``; ``std`` is Bessel-corrected, of the group
   (Shao et al. 2024, §4.1.2) or of the whole batch (TRL's ``scale_rewards="batch"``);
   ``scale="none"`` drops it, as Dr. GRPO does (Liu et al. 2025: the std biases toward too easy
   or too hard prompts). One advantage per sequence, for every token.
2. RLOO advantage ``r_i − mean_{j≠i} r_j`` (Kool et al. 2019; Ahmadian et al. 2024, Eq. 4).
3. Clipped surrogate per token with asymmetric bounds ``[1 − ε_low, 1 + ε_high]`` (DAPO's
   "clip-higher", Yu et al. 2025) plus ``β·k3`` KL to the reference per token (Shao et al.
   2024, Eq. 4), added before aggregation. TRL 1.16 by default (``use_bias_correction_kl``,
   after DeepSeek-V3.2) weights that KL by ρ; this is the paper's unweighted form, equal to
   TRL with the flag off.
4. Aggregation decides how tokens weigh: ``grpo`` averages each sequence then the batch (long
   completions get less weight per token); ``bnpo``/``dapo`` average all tokens of the batch;
   ``dr_grpo`` divides by the constant ``B·max_completion_length`` (Liu et al. 2025, no length
   bias). TRL's ``dapo`` divides by the token count of the whole generation batch (all
   processes and accumulation steps), which is ``bnpo`` for one process and one step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_core.rl._checks import as_bool_mask, require_same_shape
from rlhf_core.rl.masked import masked_mean
from rlhf_core.rl.reward_shaping import KL_ESTIMATORS

GROUP_SCALES = ("group", "batch", "none")
"""What ``group_advantages`` divides by: the group's std, the batch's std, or nothing."""

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
"""Token aggregations of ``grpo_loss`` (detail 4 of this module)."""


def _groups(fn: str, rewards: Tensor, group_size: int) -> Tensor:
    """``rewards`` (B,) viewed as (G, k), after checking B = G·k and k ≥ 2."""
    if rewards.ndim != 1:
        raise ValueError(f"{fn}: rewards must be (B,), got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"{fn}: group_size must be an int >= 2 (a baseline), got {group_size!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(
            f"{fn}: batch size {rewards.shape[0]} is not a multiple of group_size {group_size}"
        )
    return rewards.view(-1, group_size)  # (G, k)


def group_advantages(
    rewards: Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4
) -> Tensor:
    """GRPO's group-relative advantage (Shao et al. 2024, DeepSeekMath §4.1.2).

    ``Â_i = (r_i − mean(r_group)) / (std(r_group) + eps)``; ``std`` is Bessel-corrected
    (``torch.std``, as TRL's ``nanstd``), taken over the group (``scale="group"``) or the whole
    batch (``"batch"``); ``"none"`` keeps ``r_i − mean(r_group)`` unscaled (Dr. GRPO).

    Args:
        rewards: (B,) float sequence rewards, B = G·k, groups consecutive.
        group_size: k ≥ 2, completions per prompt.
        scale: one of ``GROUP_SCALES``.
        eps: added to the std so a group of equal rewards gets advantage 0, not 0/0.

    Returns:
        (B,) advantages, no gradient needed (rewards are usually detached already).
    """
    if scale not in GROUP_SCALES:
        raise ValueError(f"group_advantages: unknown scale {scale!r}; valid: {list(GROUP_SCALES)}")
    if eps < 0:
        raise ValueError(f"group_advantages: eps must be >= 0, got {eps}")
    grouped = _groups("group_advantages", rewards, group_size)  # (G, k)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (G, k)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)  # std (G, 1)
    elif scale == "batch":
        centred = centred / (rewards.std() + eps)  # std over all B rewards, 0-dim
    return centred.reshape(-1)  # (B,)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE Leave-One-Out advantage (Kool et al. 2019; Ahmadian et al. 2024, Eq. 4).

    ``Â_i = r_i − (1/(k−1)) Σ_{j≠i} r_j`` over the other samples of the same prompt, an unbiased
    baseline since it does not depend on sample ``i``. Equals ``k/(k−1)·(r_i − mean)``.

    Args:
        rewards: (B,) float sequence rewards, B = G·k, groups consecutive.
        group_size: k ≥ 2.

    Returns:
        (B,) advantages.
    """
    grouped = _groups("rloo_advantages", rewards, group_size)  # (G, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # (G, k)
    return (grouped - baseline).reshape(-1)  # (B,)


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    ref_logps: Tensor | None = None,
    beta: float = 0.0,
    max_completion_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's clipped surrogate with an optional per-token KL penalty (Shao et al. 2024, Eq. 3–4).

    Per token: ``ρ = exp(log π_θ − log π_old)``,
    ``ℓ = −min(ρ·Â, clip(ρ, 1 − ε_low, 1 + ε_high)·Â) + β·(exp(ref − log π) − (ref − log π) − 1)``
    (the KL term, Schulman's ``k3``, only when ``β ≠ 0``), then aggregated by ``loss_type``:
    ``grpo`` = mean over sequences of ``Σ_t m·ℓ / Σ_t m``; ``bnpo``/``dapo`` = ``Σ m·ℓ / Σ m``;
    ``dr_grpo`` = ``Σ m·ℓ / (B · max_completion_length)``.

    Args:
        logps: (B, T) log π_θ of the sampled tokens (with grad).
        old_logps: (B, T) the same at sampling time (no grad).
        advantages: (B,) one advantage per sequence, e.g. from ``group_advantages``.
        mask: (B, T) 1/True on completion tokens.
        epsilon_low: ε_low > 0, lower clip ``1 − ε_low``.
        epsilon_high: ε_high > 0, upper clip ``1 + ε_high``; ``None`` means ε_low.
        loss_type: one of ``GRPO_LOSS_TYPES``.
        ref_logps: (B, T) log π_ref of the sampled tokens; required when ``beta ≠ 0``.
        beta: β ≥ 0, weight of the KL penalty.
        max_completion_length: divisor for ``dr_grpo``; ``None`` means T.

    Returns:
        ``(loss, stats)``: a 0-dim loss and detached 0-dim stats ``clipfrac`` (share of tokens
        where the clipped branch is active: ``ρ < 1 − ε_low`` with ``Â < 0`` or ``ρ > 1 + ε_high``
        with ``Â > 0``), ``clipfrac_low``, ``clipfrac_high``, ``ratio_mean`` and ``kl`` (token
        mean of the k3 KL; computed whenever ``ref_logps`` is given, else 0).
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(
            f"grpo_loss: unknown loss_type {loss_type!r}; valid: {list(GRPO_LOSS_TYPES)}"
        )
    if logps.ndim != 2:
        raise ValueError(f"grpo_loss: logps must be (B, T), got shape {tuple(logps.shape)}")
    shaped = {"logps": logps, "old_logps": old_logps, "mask": mask}
    if ref_logps is not None:
        shaped["ref_logps"] = ref_logps
    require_same_shape("grpo_loss", **shaped)
    if advantages.shape != logps.shape[:1]:
        raise ValueError(
            f"grpo_loss: advantages must be (B,) = {tuple(logps.shape[:1])}, "
            f"got {tuple(advantages.shape)}"
        )
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    if not (epsilon_low > 0 and eps_high > 0):
        raise ValueError(
            f"grpo_loss: epsilon_low and epsilon_high must be > 0, got {epsilon_low}, {eps_high}"
        )
    if beta < 0:
        raise ValueError(f"grpo_loss: beta must be >= 0, got {beta}")
    if beta != 0 and ref_logps is None:
        raise ValueError(f"grpo_loss: beta={beta} needs ref_logps")
    n_max = logps.shape[1] if max_completion_length is None else max_completion_length
    if n_max < 1:
        raise ValueError(
            f"grpo_loss: max_completion_length must be >= 1, got {max_completion_length}"
        )

    m = as_bool_mask(mask)
    # Zero the padding's log-ratio before exp: garbage log-probs there must not overflow.
    ratio = torch.exp(torch.where(m, logps - old_logps, 0.0))  # (B, T)
    adv = advantages.unsqueeze(1)  # (B, 1), broadcast over tokens
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + eps_high)  # (B, T)
    per_token = -torch.min(ratio * adv, clipped * adv)  # (B, T)
    kl = None
    if ref_logps is not None:
        # k3 of KL(π_θ ‖ π_ref) = exp(ref − logp) − (ref − logp) − 1; padding's log-ratio is
        # zeroed (kl 0) before exp, as for ρ.
        kl = KL_ESTIMATORS["k3"](torch.where(m, logps - ref_logps, 0.0))  # (B, T)
        if beta != 0:
            per_token = per_token + beta * kl
    per_token = torch.where(m, per_token, 0.0)  # (B, T)

    n_tokens = m.sum()
    if n_tokens == 0:
        raise ValueError("grpo_loss: the mask has no completion token")
    if loss_type == "grpo":
        # Empty rows count as 0 in the mean over B, as in TRL.
        loss = (per_token.sum(dim=1) / m.sum(dim=1).clamp(min=1)).mean()
    elif loss_type in ("bnpo", "dapo"):
        loss = per_token.sum() / n_tokens
    else:  # dr_grpo
        loss = per_token.sum() / (logps.shape[0] * n_max)

    with torch.no_grad():
        low = (ratio < 1.0 - epsilon_low) & (adv < 0)  # (B, T)
        high = (ratio > 1.0 + eps_high) & (adv > 0)  # (B, T)
        dtype = ratio.dtype
        stats = {
            "clipfrac": masked_mean((low | high).to(dtype), m),
            "clipfrac_low": masked_mean(low.to(dtype), m),
            "clipfrac_high": masked_mean(high.to(dtype), m),
            "ratio_mean": masked_mean(ratio, m),
            "kl": masked_mean(kl, m) if kl is not None else ratio.new_zeros(()),
        }
    return loss, stats
