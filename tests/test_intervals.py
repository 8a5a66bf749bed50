"""95% bootstrap intervals of evaluation means and paired win rates: coverage on simulated data, pairing, and the
two-level bootstrap (prompts, then samples within each) used with several samples per prompt."""

from __future__ import annotations

import numpy as np
import pytest

from rlhf_core.evaluation import PolicyEvaluation, pairwise_wins, win_rate
from rlhf_core.promotion import bootstrap_mean_interval, hierarchical_bootstrap_interval, hierarchical_bootstrap_means


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


# --------------------------------------------------------------------------- k samples per prompt: two-level bootstrap


def test_two_level_bootstrap_with_one_sample_per_prompt_is_the_prompt_bootstrap():
    values = np.random.default_rng(4).normal(size=(50, 1))
    for seed in (0, 7):
        assert hierarchical_bootstrap_interval(values, confidence=0.975, n_bootstrap=500, seed=seed) == \
            bootstrap_mean_interval(values[:, 0], confidence=0.975, n_bootstrap=500, seed=seed)


def _naive_two_level_means(values: np.ndarray, n_bootstrap: int, seed: int) -> np.ndarray:
    """The scheme as loops, on the same random draws: prompts with replacement, then each one's samples."""
    rng = np.random.default_rng(seed)
    n_prompts, k = values.shape
    prompts = rng.integers(0, n_prompts, size=(n_bootstrap, n_prompts))
    within = rng.integers(0, k, size=(n_bootstrap, n_prompts, k))
    out = []
    for b in range(n_bootstrap):
        prompt_means = []
        for i in range(n_prompts):
            g = prompts[b, i]
            prompt_means.append(sum(values[g, within[b, i, j]] for j in range(k)) / k)
        out.append(sum(prompt_means) / n_prompts)
    return np.asarray(out)


def test_two_level_bootstrap_matches_the_naive_loops():
    values = np.random.default_rng(5).normal(size=(7, 3))
    fast = hierarchical_bootstrap_means(values, n_bootstrap=40, seed=3)
    assert fast.shape == (40,)
    np.testing.assert_allclose(fast, _naive_two_level_means(values, 40, 3), rtol=0, atol=1e-12)


def test_two_level_bootstrap_hand_computed_cases():
    # Two identical prompts whose samples are 0 and 1: only the second stage varies. Each resampled
    # prompt mean is 0, 1/2, 1 w.p. 1/4, 1/2, 1/4, so the grand mean of two is 0, 1/4, 1/2, 3/4, 1
    # w.p. 1/16, 4/16, 6/16, 4/16, 1/16; the prompt-only bootstrap would see no variation at all.
    values = np.array([[0.0, 1.0], [0.0, 1.0]])
    means = hierarchical_bootstrap_means(values, n_bootstrap=40000, seed=0)
    freq = {v: np.mean(means == v) for v in (0.0, 0.25, 0.5, 0.75, 1.0)}
    assert sum(freq.values()) == 1.0
    for v, p in zip(freq, (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)):
        assert abs(freq[v] - p) < 0.01, (v, freq[v], p)
    # 10% and 90% quantiles of that distribution: cumulative 1/16 < 0.1 <= 5/16 and 11/16 < 0.9 <= 15/16.
    assert hierarchical_bootstrap_interval(values, confidence=0.9, n_bootstrap=40000, seed=0) == (0.25, 0.75)
    assert bootstrap_mean_interval(values.mean(axis=1), confidence=0.9, n_bootstrap=2000, seed=0) == (0.5, 0.5)
    # Samples constant within each prompt (0 and 1): only the first stage varies, as in the prompt bootstrap.
    constant = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    means = hierarchical_bootstrap_means(constant, n_bootstrap=40000, seed=1)
    assert set(np.unique(means)) == {0.0, 0.5, 1.0} and abs(np.mean(means == 0.5) - 0.5) < 0.01


def test_two_level_bootstrap_variance_is_the_two_stage_formula():
    """Var* = (1/P)·[(1/P)·Σ_g (ȳ_g − ȳ)² + (1/(P·k))·Σ_g s_g²] (s_g²: prompt g's sample variance, ddof 0)."""
    values = np.random.default_rng(6).normal(size=(30, 4)) + np.linspace(-1, 1, 30)[:, None]
    n_prompts, k = values.shape
    expected = (values.mean(axis=1).var() + values.var(axis=1).mean() / k) / n_prompts
    means = hierarchical_bootstrap_means(values, n_bootstrap=40000, seed=2)
    assert means.var() / expected == pytest.approx(1.0, abs=0.03)
    assert means.mean() == pytest.approx(values.mean(), abs=0.01)


def test_two_level_interval_covers_a_known_mean_at_about_the_nominal_rate():
    """P prompts with their own means (sd 0.5) around 1.5, k samples each (sd 0.5 around the prompt's mean)."""
    rng = np.random.default_rng(0)
    trials, covered, n_prompts, k = 300, 0, 60, 4
    for t in range(trials):
        prompt_means = rng.normal(loc=1.5, scale=0.5, size=(n_prompts, 1))
        values = prompt_means + rng.normal(scale=0.5, size=(n_prompts, k))  # (P, k)
        low, high = hierarchical_bootstrap_interval(values, confidence=0.975, n_bootstrap=1000, seed=t)
        covered += low <= 1.5 <= high
    # nominal 0.95; resampling both stages is slightly conservative here (~0.96); binomial sd over 300 ≈ 0.013
    assert 0.91 <= covered / trials <= 0.99, covered / trials


def test_two_level_bootstrap_rejects_a_flat_array():
    with pytest.raises(ValueError, match="prompts, samples"):
        hierarchical_bootstrap_means(np.ones(5), n_bootstrap=10, seed=0)


def test_paired_win_rates_with_k_samples_pair_sample_j_with_sample_j():
    # 2 prompts x 2 samples, prompt-major: sample j of the policy against the baseline's sample j of that prompt.
    policy = PolicyEvaluation(["a", "b", "c", "d"], [1.0, 0.0, 2.0, 2.0], None, [0.0] * 4, [0.0] * 4, [1] * 4,
                              samples_per_prompt=2)
    baseline = [0.5, 0.5, 2.0, 3.0]
    wins = pairwise_wins(policy.rm_scores, baseline)
    assert wins == [1.0, 0.0, 0.5, 0.0] and win_rate(policy.rm_scores, baseline) == 1.5 / 4
    np.testing.assert_array_equal(policy.by_prompt(wins), [[1.0, 0.0], [0.5, 0.0]])


def test_evaluate_samples_per_prompt_is_a_checked_setting():
    from tasks.heldout import EvaluateConfig
    from tasks.params import ParamsError, typed

    assert typed({"evaluate": {"samples_per_prompt": 4}}, "evaluate", EvaluateConfig).samples_per_prompt == 4
    for bad, message in ((0, "evaluate: samples_per_prompt must be >= 1, got 0"), (1.5, "evaluate.samples_per_prompt")):
        with pytest.raises(ParamsError, match=message):
            typed({"evaluate": {"samples_per_prompt": bad}}, "evaluate", EvaluateConfig)


def test_distinct_n_with_k_samples_is_per_sample_set():
    from rlhf_core.evaluation import distinct_n, sample_set_distinct_n

    texts = ["a b", "a b", "c d", "c d"]  # 2 prompts x 2 samples: each sample set is fully distinct
    assert sample_set_distinct_n(texts, 1, 2) == 1.0 and distinct_n(texts, 1) == 0.5
    assert sample_set_distinct_n(["a a", "b c"], 1, 1) == distinct_n(["a a", "b c"], 1) == 0.75
    # hand count: set 0 = ["a a", "b b"] -> 2 unique of 4 unigrams; set 1 = ["a c", "b d"] -> 4 of 4
    assert sample_set_distinct_n(["a a", "a c", "b b", "b d"], 1, 2) == (2 / 4 + 4 / 4) / 2
