"""Generalised advantage estimation over response tokens (Schulman et al. 2016, Eqs. 11-16)."""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_core.rl._checks import as_bool_mask, require_contiguous_rows, require_same_shape


@torch.no_grad()
def compute_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """GAE(γ, λ) advantages and λ-returns, computed backwards over each response.

    ``δ_t = r_t + γ·V_{t+1} − V_t``, ``A_t = δ_t + γλ·A_{t+1}`` (Schulman et al. 2016,
    Eq. 16 in recursive form), ``returns_t = A_t + V_t`` (the value targets, TD(λ)).

    Each row of ``mask`` must be ONE contiguous block of response tokens, optionally with
    zeros on the left (prompt tokens, when the caller passes whole sequences) and on the
    right (padding after EOS). The episode is that block: masked positions neither
    contribute -- their ``r`` and ``V`` count as 0, so the last response token is not
    bootstrapped from the padding's value (the episode ends at EOS) -- nor receive: their
    advantages and returns are 0.

    Special cases, both tested: γ = λ = 1 gives ``A_t = Σ_{k≥t} r_k − V_t`` (reward-to-go
    minus value, Monte Carlo); λ = 0 gives the one-step TD error ``A_t = δ_t``.

    Args:
        rewards: (B, T) per-token rewards (``compute_rewards``).
        values: (B, T) value-head estimates V(s_t) from the rollout.
        mask: (B, T) 1/True on response tokens.
        gamma: discount γ in [0, 1] (1 in RLHF practice).
        lam: GAE λ in [0, 1] (0.95 in TRL's defaults).

    Returns:
        ``(advantages, returns)``, both (B, T), 0 on masked positions. Computed under
        ``torch.no_grad``: they are targets, never differentiated.

    Raises:
        ValueError: shapes differ, γ or λ outside [0, 1], or a mask row with gaps.
    """
    require_same_shape("compute_gae", rewards=rewards, values=values, mask=mask)
    if rewards.dim() != 2:
        raise ValueError(f"compute_gae: expected (B, T) tensors, got {tuple(rewards.shape)}")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"compute_gae: gamma and lam must lie in [0, 1], got {gamma=}, {lam=}")
    m = as_bool_mask(mask)
    require_contiguous_rows("compute_gae", m)
    r = torch.where(m, rewards, torch.zeros_like(rewards))  # (B, T)
    v = torch.where(m, values, torch.zeros_like(values))  # (B, T)

    advantages = torch.zeros_like(r)  # (B, T)
    next_value = torch.zeros_like(r[:, 0])  # (B,) V_{t+1}; 0 past the sequence's end
    next_advantage = torch.zeros_like(r[:, 0])  # (B,) A_{t+1}
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]  # (B,)
        # A masked position gets 0, which also cuts the recursion for the tokens before it.
        next_advantage = torch.where(m[:, t], delta + gamma * lam * next_advantage, 0.0)
        advantages[:, t] = next_advantage
        next_value = v[:, t]
    returns = advantages + v  # (B, T); 0 on masked positions, where both terms are 0
    return advantages, returns
