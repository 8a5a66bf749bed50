"""Champion/challenger: does a newly trained policy replace the one in service?

Pure functions on per-prompt scores. Both policies answer the same held-out prompts in the same
run and are scored by the same judge (the gold reward where the task has one, else this run's
reward model), so each prompt gives one paired difference ``d_i = challenger_i − champion_i``.
The challenger wins only when every criterion holds:

1. paired win rate ``P(d_i > 0) + ½·P(d_i = 0) >= min_win_rate``;
2. significance: the lower end of the one-sided ``confidence`` bootstrap interval of ``mean(d)``
   is above 0 (percentile bootstrap over prompts, Efron & Tibshirani 1993), or, with
   ``test="sign"``, the exact one-sided sign-test p-value is below ``1 − confidence``;
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


def sign_test_p_value(diffs: np.ndarray) -> float:
    """Exact one-sided sign test: P(at least k wins of m non-tied pairs | p = ½)."""
    wins, m = int((diffs > 0).sum()), int((diffs != 0).sum())
    if m == 0:
        return 1.0
    return float(sum(math.comb(m, j) for j in range(wins, m + 1)) / 2.0 ** m)


def decide(challenger: Sequence[float], baseline: Sequence[float], kl: float, criteria: PromotionCriteria, *,
           against: str = "champion") -> Decision:
    """Compare per-prompt scores (same prompts, same order) and apply ``criteria``."""
    a, b = np.asarray(challenger, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"need two equal 1-d score lists of length >= 2, got {a.shape} and {b.shape}")
    diffs = a - b
    win = paired_win_rate(diffs)
    low, high = bootstrap_mean_interval(diffs, confidence=criteria.confidence or 0.5, n_bootstrap=criteria.n_bootstrap,
                                        seed=criteria.seed)
    p_value = sign_test_p_value(diffs)
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
