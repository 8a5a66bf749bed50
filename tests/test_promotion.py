"""Champion/challenger decision (rlhf_core.promotion): pure functions on paired per-prompt scores.

Checked against hand counts, scipy's exact binomial test (when installed), and the bootstrap
bound's frequentist coverage on simulated data with a known mean.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlhf_core.promotion import (
    PromotionCriteria,
    bootstrap_mean_interval,
    decide,
    hierarchical_bootstrap_interval,
    paired_win_rate,
    sign_test_p_value,
)

# --------------------------------------------------------------------------- paired win rate


@pytest.mark.parametrize(
    ("diffs", "expected"),
    [
        ([1.0, 2.0, 3.0, 4.0], 1.0),
        ([-1.0, -2.0], 0.0),
        ([0.0, 0.0, 0.0], 0.5),  # ties count one half
        ([1.0, -1.0, 0.0, 0.0], 0.5),
        ([0.5, 0.5, 0.5, -0.1, 0.0], (3 + 0.5) / 5),
        ([1e-12, -1e-12, 2.0], 2 / 3),  # any positive difference is a win, however small
    ],
)
def test_paired_win_rate_counts_wins_and_half_ties(diffs, expected):
    assert paired_win_rate(np.asarray(diffs)) == pytest.approx(expected, abs=1e-15)


# --------------------------------------------------------------------------- sign test


def _binomial_tail(k: int, m: int) -> float:
    """P(X >= k) for X ~ Binomial(m, 1/2), written out independently of the module."""
    return sum(math.comb(m, j) for j in range(k, m + 1)) / 2**m


def test_sign_test_hand_computed_cases():
    # 8 wins of 10 non-tied pairs: (C(10,8)+C(10,9)+C(10,10)) / 2^10 = 56/1024
    diffs = np.array([1.0] * 8 + [-1.0] * 2)
    assert sign_test_p_value(diffs) == pytest.approx(56 / 1024, rel=1e-12)
    # ties are dropped: the same 8-of-10 plus 5 ties gives the same p
    assert sign_test_p_value(np.concatenate([diffs, np.zeros(5)])) == pytest.approx(56 / 1024, rel=1e-12)
    # all wins of 5: 1/32; no wins of 5: 1
    assert sign_test_p_value(np.ones(5)) == pytest.approx(1 / 32, rel=1e-12)
    assert sign_test_p_value(-np.ones(5)) == pytest.approx(1.0)
    # only ties: no evidence at all
    assert sign_test_p_value(np.zeros(7)) == 1.0


def test_sign_test_matches_scipy_binomtest():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(7)
    checked = 0
    for n in (1, 2, 5, 13, 40, 101):
        for _ in range(6):
            diffs = rng.choice([-1.0, 0.0, 0.5, 2.0], size=n, p=[0.35, 0.15, 0.25, 0.25])
            k, m = int((diffs > 0).sum()), int((diffs != 0).sum())
            if m == 0:
                assert sign_test_p_value(diffs) == 1.0
                continue
            expected = stats.binomtest(k, m, 0.5, alternative="greater").pvalue
            assert sign_test_p_value(diffs) == pytest.approx(expected, rel=1e-9, abs=1e-15), (k, m)
            assert sign_test_p_value(diffs) == pytest.approx(_binomial_tail(k, m), rel=1e-12)
            checked += 1
    assert checked >= 30


# --------------------------------------------------------------------------- bootstrap interval


def test_bootstrap_interval_is_seeded_ordered_and_brackets_the_mean():
    rng = np.random.default_rng(3)
    diffs = rng.normal(0.2, 1.0, size=60)
    low, high = bootstrap_mean_interval(diffs, confidence=0.95, n_bootstrap=2000, seed=11)
    assert low < diffs.mean() < high
    assert (low, high) == bootstrap_mean_interval(diffs, confidence=0.95, n_bootstrap=2000, seed=11)
    assert (low, high) != bootstrap_mean_interval(diffs, confidence=0.95, n_bootstrap=2000, seed=12)
    # a higher confidence widens the interval on both sides
    low99, high99 = bootstrap_mean_interval(diffs, confidence=0.99, n_bootstrap=2000, seed=11)
    assert low99 < low and high99 > high
    # the width is about 2 * 1.645 standard errors of the mean
    se = diffs.std(ddof=1) / math.sqrt(len(diffs))
    assert (high - low) / (2 * 1.645 * se) == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize(("confidence", "z"), [(0.90, 1.2816), (0.95, 1.6449), (0.99, 2.3263)])
def test_bootstrap_lower_bound_is_the_one_sided_normal_quantile_on_normal_data(confidence, z):
    """On normal data the percentile bound is about mean − z·SE, z the one-sided quantile (not the
    two-sided one: 0.95 must give 1.645 standard errors, not 1.96)."""
    diffs = np.random.default_rng(8).normal(0.0, 1.0, size=200)
    se = diffs.std(ddof=0) / math.sqrt(len(diffs))  # the bootstrap's own standard error
    low, high = bootstrap_mean_interval(diffs, confidence=confidence, n_bootstrap=20000, seed=1)
    assert (diffs.mean() - low) / se == pytest.approx(z, abs=0.12)
    assert (high - diffs.mean()) / se == pytest.approx(z, abs=0.12)


def test_bootstrap_interval_of_a_constant_is_that_constant():
    low, high = bootstrap_mean_interval(np.full(10, 0.25), confidence=0.95, n_bootstrap=500, seed=0)
    assert low == pytest.approx(0.25) and high == pytest.approx(0.25)


def test_bootstrap_lower_bound_covers_the_true_mean_at_about_the_nominal_rate():
    """One-sided 95 % lower bounds on 200 simulated datasets: ~95 % fall below the true mean."""
    rng = np.random.default_rng(2024)
    true_mean, n_datasets, n = 0.3, 200, 50
    below = 0
    for i in range(n_datasets):
        data = rng.normal(true_mean, 1.0, size=n)
        low, _ = bootstrap_mean_interval(data, confidence=0.95, n_bootstrap=2000, seed=i)
        below += low < true_mean
    coverage = below / n_datasets
    assert 0.90 <= coverage <= 0.99, coverage


# --------------------------------------------------------------------------- decide


def _paired(rng: np.random.Generator, n: int, gain: float, noise: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    champion = rng.normal(0.0, 1.0, size=n)
    return champion + gain + rng.normal(0.0, noise, size=n), champion


def test_clear_winner_is_promoted():
    challenger, champion = _paired(np.random.default_rng(0), 80, gain=1.0, noise=0.5)
    d = decide(challenger, champion, kl=0.05, criteria=PromotionCriteria(max_kl=0.5))
    assert d.promote and d.reasons == []
    assert d.against == "champion" and d.n == 80
    assert d.win_rate > 0.9 and d.ci_low > 0 and d.p_value < 1e-6
    assert d.mean_diff == pytest.approx(float(np.mean(challenger - champion)))
    assert d.ci_low <= d.mean_diff <= d.ci_high
    assert d.kl == 0.05
    as_dict = d.as_dict()
    assert as_dict["promote"] is True and as_dict["reasons"] == [] and as_dict["n"] == 80


def test_identical_challenger_is_kept_as_not_significant():
    scores = np.random.default_rng(1).normal(size=40)
    d = decide(scores, scores.copy(), kl=0.0, criteria=PromotionCriteria())
    assert not d.promote
    assert d.win_rate == 0.5 and d.mean_diff == 0.0 and d.p_value == 1.0
    assert len(d.reasons) == 1 and d.reasons[0].startswith("not significant"), d.reasons


def test_noise_only_challenger_is_not_promoted():
    # no real gain: the 95 % lower bound must not clear 0 (win rate may pass 0.5 by chance)
    challenger, champion = _paired(np.random.default_rng(5), 40, gain=0.0)
    d = decide(challenger, champion, kl=0.0, criteria=PromotionCriteria(min_win_rate=0.0))
    assert not d.promote
    assert any(r.startswith("not significant") for r in d.reasons), d.reasons


def test_win_rate_below_threshold_is_a_reason_even_when_significant():
    # few large wins, many small losses: mean gain clearly positive, win rate 0.3
    diffs = np.array([10.0] * 30 + [-0.01] * 70)
    champion = np.zeros(100)
    d = decide(champion + diffs, champion, kl=0.0, criteria=PromotionCriteria(min_win_rate=0.5, confidence=0.9))
    assert not d.promote
    assert d.win_rate == pytest.approx(0.3)
    assert d.ci_low > 0  # the mean test passes: only the win rate fails
    assert len(d.reasons) == 1 and d.reasons[0].startswith("win rate 0.300 < 0.5 against the champion"), d.reasons
    # the same data passes with a lower threshold
    assert decide(champion + diffs, champion, kl=0.0, criteria=PromotionCriteria(min_win_rate=0.25, confidence=0.9)).promote


def test_kl_over_budget_is_a_reason():
    challenger, champion = _paired(np.random.default_rng(0), 80, gain=1.0, noise=0.5)
    d = decide(challenger, champion, kl=0.8, criteria=PromotionCriteria(max_kl=0.5))
    assert not d.promote
    assert len(d.reasons) == 1 and d.reasons[0].startswith("KL to the reference 0.8000 exceeds the budget 0.5"), d.reasons
    # at the budget exactly: within it; no budget: anything goes
    assert decide(challenger, champion, kl=0.5, criteria=PromotionCriteria(max_kl=0.5)).promote
    assert decide(challenger, champion, kl=99.0, criteria=PromotionCriteria(max_kl=None)).promote
    # an undefined KL is not within any budget
    assert not decide(challenger, champion, kl=float("nan"), criteria=PromotionCriteria(max_kl=0.5)).promote


def test_every_failed_criterion_is_reported_and_against_is_named():
    scores = np.random.default_rng(2).normal(size=30)
    d = decide(scores - 1.0, scores, kl=2.0, criteria=PromotionCriteria(max_kl=1.0), against="reference")
    assert not d.promote and d.against == "reference"
    assert len(d.reasons) == 3
    assert d.reasons[0].startswith("win rate 0.000 < 0.5 against the reference")
    assert d.reasons[1].startswith("not significant")
    assert d.reasons[2].startswith("KL to the reference")


def test_confidence_zero_switches_the_significance_test_off():
    # a small consistent gain on few prompts: wins every pair but cannot be significant with n=3 (sign test)
    champion = np.array([0.0, 1.0, 2.0])
    challenger = champion + np.array([0.1, 0.2, 0.15])
    sign = PromotionCriteria(test="sign")
    d = decide(challenger, champion, kl=0.0, criteria=sign)
    assert not d.promote and d.p_value == pytest.approx(1 / 8)
    assert d.reasons[0].startswith("not significant: sign-test p = 0.1250")
    # no gain at all: with the test off only the win rate decides
    flat = np.random.default_rng(4).normal(size=20)
    for test in ("bootstrap", "sign"):
        off = PromotionCriteria(confidence=0.0, test=test, min_win_rate=0.5)
        assert decide(flat, flat.copy(), kl=0.0, criteria=off).promote, test  # win rate exactly 0.5, no test
        assert decide(challenger, champion, kl=0.0, criteria=off).promote, test
        assert not decide(flat - 1.0, flat, kl=0.0, criteria=off).promote, test


def test_sign_test_path():
    champion = np.zeros(20)
    # 15 wins, 5 losses: p = P(X >= 15 | 20, 1/2) = 0.0207
    challenger = np.array([1.0] * 15 + [-1.0] * 5)
    p = _binomial_tail(15, 20)
    assert decide(challenger, champion, kl=0.0, criteria=PromotionCriteria(test="sign", confidence=0.95)).promote
    strict = decide(challenger, champion, kl=0.0, criteria=PromotionCriteria(test="sign", confidence=0.99))
    assert not strict.promote and strict.p_value == pytest.approx(p)
    assert strict.reasons == [f"not significant: sign-test p = {p:.4f} >= 0.0100"]
    # the sign test ignores magnitudes: a huge gain on a few prompts is not enough
    lopsided = np.array([100.0] * 5 + [-0.01] * 3)
    by_sign = decide(lopsided, np.zeros(8), kl=0.0, criteria=PromotionCriteria(test="sign", min_win_rate=0.0))
    assert not by_sign.promote and by_sign.p_value == pytest.approx(_binomial_tail(5, 8))


def test_decide_is_deterministic_for_a_seed():
    challenger, champion = _paired(np.random.default_rng(9), 30, gain=0.3)
    a = decide(challenger, champion, kl=0.1, criteria=PromotionCriteria(seed=3))
    b = decide(list(challenger), list(champion), kl=0.1, criteria=PromotionCriteria(seed=3))
    assert a == b


def test_one_sample_per_prompt_is_the_default_decision():
    challenger, champion = _paired(np.random.default_rng(12), 40, gain=0.2)
    criteria = PromotionCriteria(seed=1)
    assert decide(challenger, champion, kl=0.1, criteria=criteria, samples_per_prompt=1) == \
        decide(challenger, champion, kl=0.1, criteria=criteria)


def test_k_samples_per_prompt_pair_samples_and_test_prompts():
    # 3 prompts x 2 samples, prompt-major; paired differences per prompt: (+1, -1), (+2, +2), (+1, +1).
    challenger = np.array([1.0, -1.0, 2.0, 2.0, 1.0, 1.0])
    baseline = np.zeros(6)
    d = decide(challenger, baseline, kl=0.0, criteria=PromotionCriteria(test="sign", min_win_rate=0.0),
               samples_per_prompt=2)
    assert d.n == 3 and d.win_rate == pytest.approx(5 / 6) and d.mean_diff == pytest.approx(1.0)
    # the sign test counts prompts (mean gains 0, 2, 1: one tie, 2 wins of 2), not the 6 dependent samples
    assert d.p_value == pytest.approx(_binomial_tail(2, 2)) and d.p_value != pytest.approx(_binomial_tail(5, 6))
    low, high = hierarchical_bootstrap_interval((challenger - baseline).reshape(3, 2), confidence=0.95,
                                                n_bootstrap=2000, seed=0)
    assert (d.ci_low, d.ci_high) == (low, high)


@pytest.mark.parametrize(("n", "k"), [(5, 2), (2, 2), (4, 0), (4, True)])  # not whole prompts; one prompt; bad k
def test_decide_rejects_scores_that_are_not_k_samples_of_two_prompts(n, k):
    with pytest.raises(ValueError):
        decide(np.ones(n), np.zeros(n), kl=0.0, criteria=PromotionCriteria(), samples_per_prompt=k)


@pytest.mark.parametrize(
    ("challenger", "baseline"),
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0]),  # unequal lengths
        ([1.0], [0.0]),  # too few prompts
        ([], []),
        ([[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]),  # not 1-d
    ],
)
def test_decide_rejects_bad_inputs(challenger, baseline):
    with pytest.raises(ValueError):
        decide(challenger, baseline, kl=0.0, criteria=PromotionCriteria())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_win_rate": -0.1},
        {"min_win_rate": 1.5},
        {"min_win_rate": float("nan")},
        {"confidence": 1.0},
        {"confidence": -0.5},
        {"confidence": float("nan")},
        {"max_kl": -1.0},
        {"n_bootstrap": 10},
        {"test": "wilcoxon"},  # a typo must not silently skip the significance test
    ],
)
def test_promotion_criteria_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        PromotionCriteria(**kwargs)


def test_promotion_criteria_accepts_the_edges():
    PromotionCriteria(min_win_rate=0.0, confidence=0.0, max_kl=0.0, n_bootstrap=100, test="sign")
    PromotionCriteria(min_win_rate=1.0, confidence=0.999, max_kl=None)
