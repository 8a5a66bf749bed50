"""Over-optimisation curves (Gao et al. 2022): the R(d) = d(α − β·log d) fit, peaks, the stage summary, and the
best-evaluation output of the online trainers (``best_metric``)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_core import metrics as M
from rlhf_core.overoptimization import (
    CurvePoint,
    curve_metrics,
    fit_rl_curve,
    fitted_peak,
    peak,
    rl_curve,
    sqrt_kl,
    summarize,
)

# --- the functional form and its fit --------------------------------------------------------


def naive_fit(d: list[float], r: list[float]) -> tuple[float, float]:
    """The 2×2 normal equations solved by hand: x₁ = d, x₂ = −d·log d (0 at d = 0)."""
    x1 = d
    x2 = [-v * math.log(v) if v > 0 else 0.0 for v in d]
    s11 = sum(a * a for a in x1)
    s12 = sum(a * b for a, b in zip(x1, x2))
    s22 = sum(b * b for b in x2)
    t1 = sum(a * y for a, y in zip(x1, r))
    t2 = sum(b * y for b, y in zip(x2, r))
    det = s11 * s22 - s12 * s12
    return (t1 * s22 - t2 * s12) / det, (s11 * t2 - s12 * t1) / det


def test_rl_curve_hand_values():
    d = torch.tensor([0.0, 1.0, math.e, 2.0])
    r = rl_curve(d, alpha=1.5, beta=0.5)
    assert r[0] == 0.0  # R(0) = 0: the limit of d·log d, not nan
    assert r[1] == pytest.approx(1.5)  # log 1 = 0
    assert r[2] == pytest.approx(math.e * (1.5 - 0.5))  # log e = 1
    assert r[3] == pytest.approx(2.0 * (1.5 - 0.5 * math.log(2.0)))


def test_fit_recovers_known_alpha_beta_exactly():
    d = torch.linspace(0.0, 4.0, 9)
    fit = fit_rl_curve(d, rl_curve(d, alpha=1.2, beta=0.7))
    assert fit.alpha == pytest.approx(1.2, abs=1e-9) and fit.beta == pytest.approx(0.7, abs=1e-9)
    assert fit.rmse == pytest.approx(0.0, abs=1e-9) and fit.n_points == 9


@pytest.mark.parametrize("alpha, beta", [(1.0, 0.4), (0.3, -0.1), (2.0, 1.5)])
def test_fit_recovers_alpha_beta_under_small_noise(alpha, beta):
    gen = torch.Generator().manual_seed(0)
    d = torch.linspace(0.1, 5.0, 60, dtype=torch.float64)
    noisy = rl_curve(d, alpha, beta) + 0.01 * torch.randn(60, generator=gen, dtype=torch.float64)
    fit = fit_rl_curve(d, noisy)
    assert fit.alpha == pytest.approx(alpha, abs=0.02) and fit.beta == pytest.approx(beta, abs=0.02)
    assert 0.005 < fit.rmse < 0.015  # about the noise's standard deviation


def test_fit_matches_the_hand_solved_normal_equations():
    d, r = [0.5, 1.0, 2.0, 3.0], [0.3, 0.9, 1.1, 0.8]
    fit = fit_rl_curve(torch.tensor(d, dtype=torch.float64), torch.tensor(r, dtype=torch.float64))
    alpha, beta = naive_fit(d, r)
    assert fit.alpha == pytest.approx(alpha, rel=1e-9) and fit.beta == pytest.approx(beta, rel=1e-9)
    # Hand case: points (1, 1) and (e, 0): at d = 1, R = α = 1; at d = e, e(α − β) = 0, so β = 1.
    exact = fit_rl_curve(torch.tensor([1.0, math.e]), torch.tensor([1.0, 0.0]))
    assert (exact.alpha, exact.beta) == (pytest.approx(1.0), pytest.approx(1.0))


def test_points_at_d_zero_do_not_move_the_fit():
    d, r = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0.4, 0.8, 0.9])
    with_origin = fit_rl_curve(torch.cat([torch.zeros(2), d]), torch.cat([torch.zeros(2), r]))
    without = fit_rl_curve(d, r)
    assert (with_origin.alpha, with_origin.beta) == (pytest.approx(without.alpha), pytest.approx(without.beta))
    assert with_origin.n_points == 5


@pytest.mark.parametrize("d, r, match", [
    ([1.0], [0.5], "at least 2 distinct points with d > 0"),
    ([0.0, 0.0, 2.0], [0.0, 0.0, 1.0], r"at least 2 distinct points with d > 0 .*, got 1"),
    ([1.5, 1.5, 1.5], [0.1, 0.2, 0.3], "got 1"),  # one distinct d: α and β cannot be told apart
    ([], [], "got 0"),
    ([1.0, -0.5], [0.1, 0.2], "must be >= 0"),
    ([1.0, 2.0], [0.1, float("nan")], "finite"),
    ([1.0, 2.0], [0.1], "two \\(N,\\) tensors"),
])
def test_fit_rejects_degenerate_inputs_clearly(d, r, match):
    with pytest.raises(ValueError, match=match):
        fit_rl_curve(torch.tensor(d, dtype=torch.float64), torch.tensor(r, dtype=torch.float64))


def test_fitted_peak_is_where_the_derivative_vanishes():
    from rlhf_core.overoptimization import RLCurveFit

    fit = RLCurveFit(alpha=1.0, beta=0.5, rmse=0.0, n_points=3)
    d_star, r_star = fitted_peak(fit)
    assert d_star == pytest.approx(math.exp(1.0))  # exp(α/β − 1) = e
    assert r_star == pytest.approx(float(rl_curve(torch.tensor([d_star]), 1.0, 0.5)[0]))
    grid = torch.linspace(0.01, 10, 2000, dtype=torch.float64)
    assert float(grid[rl_curve(grid, 1.0, 0.5).argmax()]) == pytest.approx(d_star, abs=0.01)
    assert fitted_peak(RLCurveFit(alpha=1.0, beta=0.0, rmse=0.0, n_points=3)) is None  # still rising
    assert fitted_peak(RLCurveFit(alpha=1.0, beta=-0.2, rmse=0.0, n_points=3)) is None


def test_peak_picks_the_highest_and_the_earliest_on_ties():
    assert peak([0, 10, 20, 30], [0.1, 0.5, 0.3, 0.5]) == (10, 0.5)
    assert peak([5], [-1.0]) == (5, -1.0)
    with pytest.raises(ValueError, match="non-empty"):
        peak([], [])
    with pytest.raises(ValueError, match="equal"):
        peak([0, 1], [0.2])


def test_sqrt_kl_counts_a_slightly_negative_estimate_as_zero():
    assert sqrt_kl(torch.tensor([-1e-4, 0.0, 4.0])).tolist() == [0.0, 0.0, 2.0]


def test_curve_metrics_of_one_checkpoint_by_hand():
    got = curve_metrics([1.0, 2.0, 3.0], [0.5, 1.5, 2.0], [0.0, 1.0, 0.5])
    assert got == {"eval/overopt/proxy_reward": 2.0, "eval/overopt/kl": pytest.approx(4.0 / 3),
                   "eval/overopt/sqrt_kl": pytest.approx(math.sqrt(4.0 / 3)), "eval/overopt/gold_reward": 0.5}
    assert curve_metrics([1.0], [-0.2])["eval/overopt/sqrt_kl"] == 0.0 and "eval/overopt/gold_reward" not in curve_metrics([1.0], [0.1])
    with pytest.raises(ValueError, match="equal, non-empty"):
        curve_metrics([1.0, 2.0], [0.1])


# --- the stage's summary ------------------------------------------------------------------------


def test_summary_reports_peak_gold_last_point_and_fits_relative_to_the_initial_policy():
    alpha_p, beta_p, alpha_g, beta_g = 1.0, 0.1, 1.0, 0.9
    kls = [0.0, 0.25, 1.0, 2.25, 4.0, 6.25, 9.0]  # d = 0, 0.5, ..., 3
    points = []
    for step, kl in zip(range(0, 70, 10), kls):
        d = torch.tensor([math.sqrt(kl)])
        points.append(CurvePoint(step=step, kl=kl, proxy=-0.5 + float(rl_curve(d, alpha_p, beta_p)[0]),
                                 gold=1.3 + float(rl_curve(d, alpha_g, beta_g)[0])))
    out, fits = summarize(list(reversed(points)))  # order does not matter
    assert out[M.OVEROPT_N_POINTS] == 7
    assert fits["proxy"].alpha == pytest.approx(alpha_p) and fits["proxy"].beta == pytest.approx(beta_p)
    assert out["overopt/gold_fit/alpha"] == pytest.approx(alpha_g) and out["overopt/gold_fit/beta"] == pytest.approx(beta_g)
    assert out["overopt/gold_fit/peak_sqrt_kl"] == pytest.approx(math.exp(alpha_g / beta_g - 1))  # ≈ 1.12
    # Gold peaks at d = 1 (step 20) among the points, then falls while the proxy keeps rising.
    gold = {p.step: p.gold for p in points}
    assert out[M.OVEROPT_PEAK_GOLD_STEP] == 20 and out[M.OVEROPT_PEAK_GOLD] == pytest.approx(gold[20])
    assert out[M.OVEROPT_PEAK_GOLD_SQRT_KL] == pytest.approx(1.0)
    assert out[M.OVEROPT_LAST_STEP] == 60 and out[M.OVEROPT_LAST_GOLD] < out[M.OVEROPT_PEAK_GOLD]
    assert out[M.OVEROPT_LAST_PROXY] > out[M.OVEROPT_PEAK_GOLD_PROXY]


def test_summary_without_an_initial_point_or_gold_gives_no_fit_but_the_rest():
    no_origin, fits = summarize([CurvePoint(10, proxy=0.2, kl=1.0, gold=1.0), CurvePoint(20, proxy=0.4, kl=2.0, gold=0.9),
                                 CurvePoint(30, proxy=0.5, kl=3.0, gold=0.8)])
    assert fits == {} and not any("_fit/" in k for k in no_origin)
    assert no_origin[M.OVEROPT_PEAK_GOLD_STEP] == 10 and no_origin[M.OVEROPT_N_POINTS] == 3
    no_gold, fits = summarize([CurvePoint(0, proxy=0.0, kl=0.0), CurvePoint(5, proxy=0.3, kl=1.0),
                               CurvePoint(10, proxy=0.4, kl=4.0)])
    assert set(fits) == {"proxy"} and M.OVEROPT_PEAK_GOLD_STEP not in no_gold
    too_few, fits = summarize([CurvePoint(0, proxy=0.0, kl=0.0, gold=1.0), CurvePoint(5, proxy=0.3, kl=1.0, gold=1.1)])
    assert fits == {} and too_few[M.OVEROPT_PEAK_GOLD_STEP] == 5  # one d > 0: nothing to fit, still a peak
    assert summarize([]) == ({M.OVEROPT_N_POINTS: 0.0}, {})
