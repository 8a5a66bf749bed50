"""Champion/challenger: does a newly trained policy replace the one in service?

Pure functions on per-prompt scores. Both policies answer the same held-out prompts in the same
run and are scored by the same judge (the gold reward where the task has one, else this run's
reward model), so each prompt gives one paired difference ``d_i = challenger_i − champion_i``
(or k of them, sample j against sample j, with k samples per prompt).
The challenger wins only when every criterion holds:

1. paired win rate ``P(d_i > 0) + ½·P(d_i = 0) >= min_win_rate``;
2. significance: the lower end of the one-sided ``confidence`` bootstrap interval of ``mean(d)``
   is above 0 (percentile bootstrap over prompts, Efron & Tibshirani 1993; with several samples
   per prompt, two-level: prompts, then samples within each, Davison & Hinkley 1997 §3.8), or,
   with ``test="sign"``, the exact one-sided sign-test p-value (over prompts) is below ``1 − confidence``;
3. KL budget: the challenger's KL to this run's reference (nats per token) is at most ``max_kl``.

Without a champion (the first run) the challenger is crowned when it passes the same tests
against the reference policy (SFT) instead, the absolute gate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np


@dataclass
class PromotionCriteria:
    """When a challenger replaces the champion (the ``promote`` group of ``params.yaml``)."""

    min_win_rate: float = 0.5
    """Paired win rate over the champion (ties count ½) the challenger must reach."""
    confidence: float = 0.95
    """One-sided confidence that the challenger's mean score is higher; 0 switches the test off."""
    test: Literal["bootstrap", "sign"] = "bootstrap"
    """``bootstrap``: percentile interval of the mean paired difference; ``sign``: exact sign test."""
    max_kl: float | None = None
    """KL budget to this run's reference, nats per token (None: no budget)."""
    n_bootstrap: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_win_rate <= 1.0:
            raise ValueError(f"min_win_rate must be in [0, 1], got {self.min_win_rate}")
        if not 0.0 <= self.confidence < 1.0:
            raise ValueError(f"confidence must be in [0, 1), got {self.confidence}")
        if self.test not in ("bootstrap", "sign"):  # anything else would silently skip the significance test
            raise ValueError(f"test must be 'bootstrap' or 'sign', got {self.test!r}")
        if self.max_kl is not None and self.max_kl < 0:
            raise ValueError(f"max_kl must be >= 0 or null, got {self.max_kl}")
        if self.n_bootstrap < 100:
            raise ValueError(f"n_bootstrap must be >= 100, got {self.n_bootstrap}")


@dataclass
class Decision:
    promote: bool
    against: str
    """``champion`` or ``reference`` (no champion yet: the absolute gate)."""
    n: int
    win_rate: float
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float
    kl: float
    reasons: list[str] = field(default_factory=list)
    """Each failed criterion in words (empty when promoted)."""

    def as_dict(self) -> dict:
        return asdict(self)


def paired_win_rate(diffs: np.ndarray) -> float:
    return float(((diffs > 0).sum() + 0.5 * (diffs == 0).sum()) / len(diffs))


def bootstrap_mean_interval(diffs: np.ndarray, *, confidence: float, n_bootstrap: int, seed: int) -> tuple[float, float]:
    """Two-sided percentile interval of ``mean(diffs)`` at ``2·confidence − 1``; its lower end is the
    one-sided ``confidence`` bound. Resamples prompts with replacement (shape (n_bootstrap, n))."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diffs), size=(n_bootstrap, len(diffs)))  # (n_bootstrap, n)
    means = diffs[idx].mean(axis=1)  # (n_bootstrap,)
    tail = 1.0 - confidence
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def hierarchical_bootstrap_means(values: np.ndarray, *, n_bootstrap: int, seed: int) -> np.ndarray:
    """Bootstrap replicates of the grand mean of ``values`` (shape (P, k): k samples of each of P
    prompts) by the two-level (two-stage, hierarchical) bootstrap, Davison & Hinkley (1997) §3.8:

    1. resample P prompts with replacement: g*_1 … g*_P uniform on {1 … P};
    2. within each resampled prompt g*_i, resample its k samples with replacement: j*_i1 … j*_ik
       uniform on {1 … k};

    θ*_b = (1/P) Σ_i (1/k) Σ_l y[g*_i, j*_il]. Each replicate's variance is
    Var*(θ*) = (1/P)·[ (1/P) Σ_g (ȳ_g − ȳ)² + (1/(P·k)) Σ_g s_g² ], with ȳ_g and s_g² (ddof 0) the
    mean and variance of prompt g's k samples. Resampling the second stage as well is slightly
    conservative (the within-prompt part counts about twice as k grows). With k = 1 the second
    stage is the identity and the replicates are exactly those of :func:`bootstrap_mean_interval`
    (same seed, same prompt draws). Returns shape (n_bootstrap,).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < 1 or values.shape[1] < 1:
        raise ValueError(f"hierarchical bootstrap needs a (prompts, samples) array with both >= 1, got shape {values.shape}")
    n_prompts, k = values.shape
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, n_prompts, size=(n_bootstrap, n_prompts))  # (n_bootstrap, P): stage 1
    if k == 1:
        return values[prompts, 0].mean(axis=1)  # (n_bootstrap,): no second stage to draw
    within = rng.integers(0, k, size=(n_bootstrap, n_prompts, k))  # (n_bootstrap, P, k): stage 2
    resampled = values[prompts[:, :, None], within]  # (n_bootstrap, P, k)
    return resampled.mean(axis=2).mean(axis=1)  # (n_bootstrap,): per-prompt means, then over prompts


def hierarchical_bootstrap_interval(values: np.ndarray, *, confidence: float, n_bootstrap: int,
                                    seed: int) -> tuple[float, float]:
    """Two-sided percentile interval at ``2·confidence − 1`` of the grand mean of ``values`` (P, k)
    over prompts and samples, by the two-level bootstrap of :func:`hierarchical_bootstrap_means`.

    Paired statistics (win rates, score differences) keep their pairing: row g, column j holds
    sample j of the policy against sample j of the baseline on prompt g, and the pair is resampled
    as one value. With k = 1 it equals :func:`bootstrap_mean_interval` on ``values[:, 0]``.
    """
    means = hierarchical_bootstrap_means(values, n_bootstrap=n_bootstrap, seed=seed)  # (n_bootstrap,)
    tail = 1.0 - confidence
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def sign_test_p_value(diffs: np.ndarray) -> float:
    """Exact one-sided sign test: P(at least k wins of m non-tied pairs | p = ½)."""
    wins, m = int((diffs > 0).sum()), int((diffs != 0).sum())
    if m == 0:
        return 1.0
    return float(sum(math.comb(m, j) for j in range(wins, m + 1)) / 2.0 ** m)


def decide(challenger: Sequence[float], baseline: Sequence[float], kl: float, criteria: PromotionCriteria, *,
           against: str = "champion", samples_per_prompt: int = 1) -> Decision:
    """Compare paired scores (same prompts, same order) and apply ``criteria``.

    With ``samples_per_prompt`` k > 1 both lists hold k samples per prompt in consecutive rows
    (rows ``g·k … g·k + k − 1`` answer prompt ``g``; sample j of the challenger is paired with
    sample j of the baseline): the win rate and mean gain are over all pairs, the interval is the
    two-level bootstrap (prompts, then samples within them: :func:`hierarchical_bootstrap_interval`)
    and the sign test counts prompts whose mean gain is positive (samples of one prompt are not
    independent). ``n`` is the number of prompts.
    """
    a, b = np.asarray(challenger, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    k = samples_per_prompt
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"samples_per_prompt must be an int >= 1, got {k!r}")
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2 * k or len(a) % k:
        raise ValueError(f"need two equal 1-d score lists of {k} sample(s) for each of >= 2 prompts, got {a.shape} and {b.shape}")
    diffs = (a - b).reshape(-1, k)  # (P, k): row g holds prompt g's paired differences
    win = paired_win_rate(diffs.ravel())
    low, high = hierarchical_bootstrap_interval(diffs, confidence=criteria.confidence or 0.5, n_bootstrap=criteria.n_bootstrap,
                                                seed=criteria.seed)
    p_value = sign_test_p_value(diffs.mean(axis=1))  # (P,): one sign per prompt
    reasons = []
    if win < criteria.min_win_rate:
        reasons.append(f"win rate {win:.3f} < {criteria.min_win_rate} against the {against}")
    if criteria.confidence > 0:
        if criteria.test == "bootstrap" and not low > 0:
            reasons.append(f"not significant: {criteria.confidence:.0%} lower bound of the mean gain is {low:.4f} <= 0")
        if criteria.test == "sign" and not p_value < 1 - criteria.confidence:
            reasons.append(f"not significant: sign-test p = {p_value:.4f} >= {1 - criteria.confidence:.4f}")
    if criteria.max_kl is not None and not kl <= criteria.max_kl:
        reasons.append(f"KL to the reference {kl:.4f} exceeds the budget {criteria.max_kl}")
    return Decision(promote=not reasons, against=against, n=len(diffs), win_rate=win, mean_diff=float(diffs.mean()),
                    ci_low=low, ci_high=high, p_value=p_value, kl=float(kl), reasons=reasons)
