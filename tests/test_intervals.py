"""95% bootstrap intervals of evaluation means and paired win rates: coverage on simulated data, pairing."""

from __future__ import annotations

import numpy as np

from rlhf_core.evaluation import pairwise_wins, win_rate
from rlhf_core.promotion import bootstrap_mean_interval


def test_the_interval_covers_a_known_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    trials, covered = 300, 0
    for t in range(trials):
        sample = rng.normal(loc=1.5, scale=0.7, size=200)
        low, high = bootstrap_mean_interval(sample, confidence=0.975, n_bootstrap=1000, seed=t)
        covered += low <= 1.5 <= high
    assert 0.91 <= covered / trials <= 0.99, covered / trials  # nominal 0.95; binomial sd over 300 trials ≈ 0.013


def test_win_rate_interval_is_over_paired_prompts():
    rng = np.random.default_rng(1)
    base = rng.normal(size=400)
    better = base + rng.normal(loc=0.3, scale=0.2, size=400)  # paired: the same prompt's difficulty cancels
    wins = pairwise_wins(list(better), list(base))
    assert np.mean(wins) == win_rate(list(better), list(base))
    low, high = bootstrap_mean_interval(np.asarray(wins), confidence=0.975, n_bootstrap=2000, seed=0)
    assert 0.5 < low <= np.mean(wins) <= high < 1.0
    assert pairwise_wins([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == [0.5, 0.0, 1.0]
