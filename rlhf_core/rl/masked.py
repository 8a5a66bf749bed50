"""Statistics over the real (unmasked) tokens of a padded batch.

The PPO pipeline whitens rewards and advantages with these (Ziegler et al. 2019's
``lm-human-preferences``; details 3 and 5 of ``rlhf_core.rl``). Masked positions are read
with ``torch.where``, never multiplied, so ``inf``/``nan`` in padding (e.g. log-probs of
pad tokens) cannot leak into the result.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_core.rl._checks import as_bool_mask, require_same_shape

WHITEN_EPS = 1e-8
"""Added to the variance before the square root so a constant batch does not divide by 0."""


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is true.

    Args:
        x: any shape, e.g. (B, T).
        mask: same shape as ``x``; 1/True marks a real token.
        dim: reduce only this dimension; ``None`` reduces all of them to a scalar.

    Returns:
        ``sum(x·m) / sum(m)``: a 0-dim tensor for ``dim=None``, else ``x``'s shape without
        ``dim``. With ``dim`` given, a slice with no unmasked position gets 0.

    Raises:
        ValueError: shapes differ, or ``dim=None`` and the mask is all zeros.
    """
    require_same_shape("masked_mean", x=x, mask=mask)
    m = as_bool_mask(mask)
    total = torch.where(m, x, torch.zeros_like(x))
    if dim is None:
        count = m.sum()
        if count == 0:
            raise ValueError("masked_mean: the mask has no unmasked position")
        return total.sum() / count
    count = m.sum(dim=dim).clamp(min=1)  # empty slices: 0 / 1 = 0
    return total.sum(dim=dim) / count


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = False) -> Tensor:
    """Variance of ``x`` over the unmasked positions (all dimensions pooled), a 0-dim tensor.

    ``var = Σ m·(x − μ)² / n`` with ``μ = masked_mean(x, mask)`` and ``n = Σ m``; with
    ``unbiased=True`` the sum is divided by ``n − 1`` (Bessel's correction) instead.

    Raises:
        ValueError: shapes differ, the mask is empty, or ``unbiased`` with a single position.
    """
    m = as_bool_mask(mask)
    require_same_shape("masked_var", x=x, mask=m)
    x = torch.where(m, x, torch.zeros_like(x))  # finite padding: no nan in the gradient
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    if unbiased:
        n = m.sum()
        if n < 2:
            raise ValueError("masked_var: unbiased variance needs at least 2 unmasked positions")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise ``x`` to mean 0 and variance 1 over the unmasked positions.

    ``x̂ = (x − μ) / sqrt(σ² + 1e-8)`` with the masked mean ``μ`` and BIASED masked variance
    ``σ²`` (``masked_var(..., unbiased=False)``), pooled over the whole batch. With
    ``shift_mean=False`` the mean is added back, ``x̂ + μ``: only the scale changes (how
    lm-human-preferences whitens rewards, keeping their sign information).

    Args:
        x: any shape, e.g. (B, T).
        mask: same shape; 1/True marks a real token.
        shift_mean: subtract the mean (True) or keep it (False).

    Returns:
        Same shape as ``x``; masked positions are 0, so a whitened padding token never looks
        like a real one (TRL's old ``whiten`` left values there; we zero them).
    """
    m = as_bool_mask(mask)
    require_same_shape("masked_whiten", x=x, mask=m)
    x = torch.where(m, x, torch.zeros_like(x))  # finite padding: no nan in the gradient
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=False)
    whitened = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, torch.zeros_like(whitened))
