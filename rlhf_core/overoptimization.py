"""Reward-model over-optimisation curves (Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model Overoptimization").

A policy-training stage evaluates its policy at checkpoints on the same held-out prompts and
records, per checkpoint, the proxy (reward-model) score, the gold reward where the task has one,
and the KL to the reference policy. Gao et al. plot both rewards against the distance

    d := sqrt(D_KL(π ‖ π_init))

and fit, for RL (their Eq. 2; best-of-n has ``d(α − β·d)`` instead),

    R_RL(d) = d · (α_RL − β_RL · log d)

where R is the reward minus the initial policy's (so ``R(0) = 0``, as the form requires; the d = 0
point is the initial policy itself). The form is linear in (α, β): with ``x₁ = d`` and
``x₂ = −d·log d`` it is ``R = α·x₁ + β·x₂``, so the least-squares fit is closed-form
(:func:`fit_rl_curve`). For β > 0 the fitted curve peaks at ``d* = exp(α/β − 1)`` with
``R(d*) = β·d*`` (:func:`fitted_peak`): the gold curve's peak is where more optimisation of the
proxy stops paying. Pure functions on tensors and lists; the stages write the CSV, the plot and
the summary (``tasks/overoptimization.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf_core import metrics as M


@dataclass(frozen=True)
class RLCurveFit:
    """Least-squares (α, β) of ``R(d) = d(α − β·log d)`` and how well it fits."""

    alpha: float
    beta: float
    rmse: float
    """Root mean squared residual over the fitted points."""
    n_points: int


def sqrt_kl(kl: Tensor) -> Tensor:
    """d = sqrt(KL), shape kept. A Monte-Carlo KL estimate can dip just below 0 near the initial policy: it counts as 0."""
    return kl.clamp(min=0.0).sqrt()


def rl_curve(d: Tensor, alpha: float, beta: float) -> Tensor:
    """Gao et al. Eq. 2, ``R(d) = d(α − β·log d)``, for d of any shape (≥ 0); ``R(0) = 0`` (the limit of d·log d)."""
    d = d.to(torch.float64)
    d_log_d = torch.where(d > 0, d * torch.log(torch.where(d > 0, d, 1.0)), 0.0)  # 0·log 0 := 0
    return alpha * d - beta * d_log_d


def fit_rl_curve(d: Tensor, reward: Tensor) -> RLCurveFit:
    """Least-squares fit of ``R(d) = d(α − β·log d)`` to points (d_i, R_i).

    Args:
        d: (N,) sqrt(KL) of each point, ≥ 0.
        reward: (N,) reward minus the initial policy's at each point.

    Returns:
        :class:`RLCurveFit`: ``argmin_{α,β} Σ_i (R_i − α·d_i + β·d_i·log d_i)²``, the least-squares solution of
        ``X·[α, β]ᵀ ≈ R`` with ``X = [d, −d·log d]`` (N, 2), from its 2×2 normal equations ``XᵀX·θ = XᵀR`` with
        exactly rounded sums (``math.fsum``): the same bits on every machine and in every process (a LAPACK solve
        can differ in the last bits with memory alignment, and ``rlhf reproduce`` compares metrics exactly).

    Raises:
        ValueError: on mismatched or non-finite inputs, a negative d, or fewer than two distinct d > 0 (points at
            d = 0 carry no information on α, β: every curve of the family passes through the origin).
    """
    d, reward = torch.as_tensor(d, dtype=torch.float64), torch.as_tensor(reward, dtype=torch.float64)
    if d.ndim != 1 or d.shape != reward.shape:
        raise ValueError(f"fit_rl_curve: d and reward must be two (N,) tensors, got {tuple(d.shape)} and {tuple(reward.shape)}")
    if not (torch.isfinite(d).all() and torch.isfinite(reward).all()):
        raise ValueError("fit_rl_curve: d and reward must be finite")
    if (d < 0).any():
        raise ValueError(f"fit_rl_curve: d = sqrt(KL) must be >= 0, got {d.min().item()}")
    distinct = torch.unique(d[d > 0])
    if len(distinct) < 2:
        raise ValueError(f"fit_rl_curve: needs at least 2 distinct points with d > 0 to fit (alpha, beta), got {len(distinct)}")
    x1, x2, r = rl_curve(d, 1.0, 0.0).tolist(), rl_curve(d, 0.0, 1.0).tolist(), reward.tolist()  # d, −d·log d, R

    def dot(u: list[float], v: list[float]) -> float:
        return math.fsum(a * b for a, b in zip(u, v))

    a, b, c = dot(x1, x1), dot(x1, x2), dot(x2, x2)  # XᵀX = [[a, b], [b, c]], invertible for 2 distinct d > 0
    det = a * c - b * b
    alpha, beta = (c * dot(x1, r) - b * dot(x2, r)) / det, (a * dot(x2, r) - b * dot(x1, r)) / det
    residual = [ri - alpha * u - beta * v for ri, u, v in zip(r, x1, x2)]
    return RLCurveFit(alpha=alpha, beta=beta, rmse=math.sqrt(math.fsum(e * e for e in residual) / len(r)), n_points=len(d))


def fitted_peak(fit: RLCurveFit) -> tuple[float, float] | None:
    """(d*, R(d*)) where the fitted curve peaks: ``dR/dd = α − β(log d + 1) = 0`` gives ``d* = exp(α/β − 1)`` and
    ``R(d*) = β·d*``. ``None`` when β ≤ 0 (the curve keeps rising) or d* overflows."""
    if fit.beta <= 0:
        return None
    exponent = fit.alpha / fit.beta - 1.0
    if exponent > 700:  # exp overflows a float: no peak in any reachable range
        return None
    d_star = math.exp(exponent)
    return d_star, fit.beta * d_star


def peak(steps: Sequence[int], values: Sequence[float]) -> tuple[int, float]:
    """(step, value) of the highest value; the earliest step on ties. Raises ``ValueError`` on empty or unequal inputs."""
    if not steps or len(steps) != len(values):
        raise ValueError(f"peak: needs equal, non-empty steps and values; got {len(steps)} and {len(values)}")
    best = max(range(len(steps)), key=lambda i: (values[i], -steps[i]))
    return int(steps[best]), float(values[best])


def curve_metrics(proxy: Sequence[float], kl: Sequence[float], gold: Sequence[float] | None = None) -> dict[str, float]:
    """One checkpoint's curve point from its N held-out responses, as ``eval/overopt/...`` metrics.

    Args:
        proxy: (N,) proxy (reward-model) score of each response.
        kl: (N,) k1 KL of each response to the reference, Σ_t (log π − log π_ref) (``evaluation.sequence_kl``).
        gold: (N,) gold reward of each response, or ``None``.

    Returns:
        the means of proxy, gold and KL, and ``sqrt_kl`` = sqrt(max(mean KL, 0)) (d of Gao et al.: the root of the
        KL estimate, not the mean of per-response roots).
    """
    n = len(proxy)
    if n == 0 or len(kl) != n or (gold is not None and len(gold) != n):
        raise ValueError(f"curve_metrics: needs equal, non-empty lists; got {n} proxy, {len(kl)} kl, "
                         f"{None if gold is None else len(gold)} gold")
    mean_kl = sum(kl) / n
    out = {M.key(M.EVAL, M.OVEROPT_PROXY): sum(proxy) / n, M.key(M.EVAL, M.OVEROPT_KL): mean_kl,
           M.key(M.EVAL, M.OVEROPT_SQRT_KL): math.sqrt(max(mean_kl, 0.0))}
    if gold is not None:
        out[M.key(M.EVAL, M.OVEROPT_GOLD)] = sum(gold) / n
    return out


@dataclass(frozen=True)
class CurvePoint:
    """One evaluation checkpoint of a curve: mean proxy score, mean gold reward (or ``None``) and mean KL (nats/sequence)."""

    step: int
    proxy: float
    kl: float
    gold: float | None = None


def summarize(points: Sequence[CurvePoint]) -> tuple[dict[str, float], dict[str, RLCurveFit]]:
    """The numbers a stage reports about its curve, under :mod:`rlhf_core.metrics` names, and the fits.

    - ``overopt/points``: the number of checkpoints;
    - the checkpoint of peak gold reward: its step, gold reward, proxy score and sqrt(KL) (when every point has gold);
    - the last checkpoint's proxy and gold, beside the peak's, so "proxy still rising where gold fell" reads off;
    - per reward (``proxy``, ``gold``): α, β, rmse of :func:`fit_rl_curve` on the reward minus the initial policy's
      (the step-0 point), and the fitted peak ``d*`` when β > 0. No step-0 point or fewer than two distinct d > 0:
      no fit (its keys are absent; the other numbers are still given).

    Points are sorted by step; a step given twice keeps its last point.
    """
    by_step = {p.step: p for p in points}
    ordered = [by_step[s] for s in sorted(by_step)]
    out: dict[str, float] = {M.OVEROPT_N_POINTS: float(len(ordered))}
    fits: dict[str, RLCurveFit] = {}
    if not ordered:
        return out, fits
    steps = [p.step for p in ordered]
    d = sqrt_kl(torch.tensor([p.kl for p in ordered], dtype=torch.float64))  # (N,)
    series = {M.OVEROPT_PROXY_SERIES: [p.proxy for p in ordered]}
    if all(p.gold is not None for p in ordered):
        series[M.OVEROPT_GOLD_SERIES] = [float(p.gold) for p in ordered]  # type: ignore[arg-type]
        best_step, best_gold = peak(steps, series[M.OVEROPT_GOLD_SERIES])
        at = steps.index(best_step)
        out.update({M.OVEROPT_PEAK_GOLD_STEP: float(best_step), M.OVEROPT_PEAK_GOLD: best_gold,
                    M.OVEROPT_PEAK_GOLD_PROXY: ordered[at].proxy, M.OVEROPT_PEAK_GOLD_SQRT_KL: float(d[at]),
                    M.OVEROPT_LAST_GOLD: ordered[-1].gold})  # type: ignore[dict-item]
    out.update({M.OVEROPT_LAST_STEP: float(steps[-1]), M.OVEROPT_LAST_PROXY: ordered[-1].proxy,
                M.OVEROPT_LAST_SQRT_KL: float(d[-1])})
    if steps[0] != 0:  # the initial policy is the curve's origin
        return out, fits
    for name, values in series.items():
        relative = torch.tensor(values, dtype=torch.float64) - values[0]  # (N,) R − R(initial policy)
        try:
            fit = fit_rl_curve(d, relative)
        except ValueError:
            continue
        fits[name] = fit
        out.update({M.overopt_fit(name, "alpha"): fit.alpha, M.overopt_fit(name, "beta"): fit.beta,
                    M.overopt_fit(name, "rmse"): fit.rmse})
        top = fitted_peak(fit)
        if top is not None:
            out[M.overopt_fit(name, "peak_sqrt_kl")] = top[0]
    return out, fits
