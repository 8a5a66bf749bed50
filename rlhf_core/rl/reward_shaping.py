"""Reward shaping for PPO: the per-token KL penalty plus the sequence score at EOS (Ziegler et al. 2019; Ouyang et al. 2022).

The RLHF objective maximises ``E[r_φ(x, y)] − β·KL(π_θ(·|x) ‖ π_ref(·|x))``. As in
lm-human-preferences and TRL, the KL is spent token by token -- every response token is
rewarded ``−β·kl_t`` -- and the reward model's score is added at the last response token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rlhf_core.rl._checks import as_bool_mask, require_same_shape


def _k1(log_ratio: Tensor) -> Tensor:
    # log π(a) − log π_ref(a): unbiased, can be negative per token.
    return log_ratio


def _k2(log_ratio: Tensor) -> Tensor:
    # ½ (log π − log π_ref)²: biased, ≥ 0, low variance.
    return 0.5 * log_ratio**2


def _k3(log_ratio: Tensor) -> Tensor:
    # (r − 1) − log r with r = π_ref/π = exp(−log_ratio): unbiased and ≥ 0 (log r ≤ r − 1).
    neg = -log_ratio
    return torch.expm1(neg) - neg


KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}
"""Schulman (2020), "Approximating KL Divergence": estimators of KL(π ‖ π_ref) from samples of π,
each a function of the per-token log-ratio ``log π − log π_ref``."""


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) at the sampled tokens.

    With ``d = logprobs − ref_logprobs`` (so ``r = π_ref/π_θ = exp(−d)``):

    - ``k1 = d`` (the naive estimator used by Ziegler et al. 2019 and Ouyang et al. 2022);
    - ``k2 = ½ d²``;
    - ``k3 = exp(−d) − 1 + d = (r − 1) − log r`` (≥ 0, unbiased).

    Args:
        logprobs: (B, T) log π_θ(y_t | x, y_<t) of the sampled tokens.
        ref_logprobs: (B, T) the same under the frozen reference π_ref.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        (B, T) per-token estimates; padding positions are NOT masked here.

    Raises:
        ValueError: unknown ``estimator`` (the message lists the known ones) or shapes differ.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"kl_penalty: unknown estimator {estimator!r}; known: {sorted(KL_ESTIMATORS)}"
        )
    require_same_shape("kl_penalty", logprobs=logprobs, ref_logprobs=ref_logprobs)
    return KL_ESTIMATORS[estimator](logprobs - ref_logprobs)


def _last_token(mask: Tensor) -> Tensor:
    """(B, T) bool, true only at the last unmasked position of each row of ``mask`` (B, T).

    Raises:
        ValueError: a row has no unmasked position (the message lists the rows).
    """
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)  # (B, T)
    last = torch.where(mask, positions, -1).amax(dim=-1, keepdim=True)  # (B, 1); -1: empty row
    empty = (last.squeeze(-1) < 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"compute_rewards: mask rows {empty[:10]} have no response token")
    return positions == last  # (B, T)


def compute_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float | Tensor,
    estimator: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Shaped per-token rewards: KL penalty on every response token, score at the last one.

    ``R_t = −β·kl_t + 1[t = t_last]·r_φ(x, y)`` (Ziegler et al. 2019 Eq. 2; Ouyang et al.
    2022 Eq. 2; details 1-2 of ``rlhf_core.rl``). ``t_last`` is the last unmasked position of
    the row, i.e. the EOS token or the last token of a truncated response.

    Args:
        scores: (B,) reward-model scores r_φ(x, y) of the whole responses.
        logprobs: (B, T) log-probs of the sampled response tokens under the policy.
        ref_logprobs: (B, T) the same under the reference model.
        mask: (B, T) 1/True on response tokens (leading prompt and trailing padding are 0).
        kl_coef: β ≥ 0, a float or a 0-dim tensor (e.g. ``AdaptiveKLController.value``).
        estimator: KL estimator passed to ``kl_penalty``.

    Returns:
        ``(rewards, kl)``, both (B, T) and 0 on masked positions; ``kl`` is
        ``kl_penalty(...)·mask`` for logging (``objective/kl`` is its row sum, averaged).

    Raises:
        ValueError: shape mismatch, ``scores`` not (B,), or a row with an empty mask.
    """
    require_same_shape("compute_rewards", logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if scores.dim() != 1 or scores.shape[0] != logprobs.shape[0]:
        raise ValueError(
            f"compute_rewards: scores must be (B,) with B={logprobs.shape[0]}, "
            f"got {tuple(scores.shape)}"
        )
    m = as_bool_mask(mask)
    is_last = _last_token(m)  # (B, T)
    per_token = kl_penalty(logprobs, ref_logprobs, estimator)  # (B, T)
    kl = torch.where(m, per_token, torch.zeros_like(per_token))  # (B, T)
    score_at_last = torch.where(is_last, scores.to(kl.dtype).unsqueeze(-1), 0.0)  # (B, T)
    rewards = -kl_coef * kl + score_at_last  # (B, T)
    return rewards, kl
