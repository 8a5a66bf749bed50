"""KTO, ORPO and SimPO losses against naive per-row loops and hand-computed cases.

TRL 1.16 parity is in tests/test_trl_reference_grpo_offline.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_core.losses import dpo_loss, kto_loss, orpo_loss, simpo_loss


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _log1mexp(x: float) -> float:
    """log(1 − eˣ) in double precision, the better-conditioned form on each side of −ln 2."""
    return math.log(-math.expm1(x)) if x > -math.log(2) else math.log1p(-math.exp(x))


def _logps(seed: int, n: int, low: float = -4.0) -> torch.Tensor:
    """Length-averaged log-probs in (low, 0)."""
    g = torch.Generator().manual_seed(seed)
    return low * torch.rand(n, generator=g, dtype=torch.float64).clamp(min=1e-6)


# ------------------------------------------------------------------------------------------------ KTO


@pytest.mark.parametrize("n", [1, 5, 16])
@pytest.mark.parametrize(("kl", "w_d", "w_u"), [(0.0, 1.0, 1.0), (0.7, 1.0, 1.33), (-0.3, 0.5, 2.0)])
def test_kto_loss_matches_naive_loop(n: int, kl: float, w_d: float, w_u: float) -> None:
    g = torch.Generator().manual_seed(n)
    policy = -20 * torch.rand(n, generator=g, dtype=torch.float64)
    ref = policy + torch.randn(n, generator=g, dtype=torch.float64) * 2
    desirable = torch.rand(n, generator=g) > 0.5
    beta = 0.3
    losses, rewards = kto_loss(policy, ref, desirable, kl, beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    z0 = max(kl, 0.0)  # a negative KL estimate is clamped to 0
    for i in range(n):
        r = float(policy[i] - ref[i])
        if desirable[i]:
            expected = w_d * (1 - _sigmoid(beta * (r - z0)))
        else:
            expected = w_u * (1 - _sigmoid(beta * (z0 - r)))
        assert losses[i].item() == pytest.approx(expected, abs=1e-12)
        assert rewards[i].item() == pytest.approx(beta * r, abs=1e-12)


def test_kto_loss_hand_values() -> None:
    # β = 0.5, KL = 0.4. Row 0 desirable, r = -3 - (-4) = 1: 1 - σ(0.5·(1 - 0.4)) = 1 - σ(0.3)
    # = 1 - 0.5744425 = 0.4255575. Row 1 undesirable, r = -1, w_u = 2: 2·(1 - σ(0.5·(0.4 + 1)))
    # = 2·(1 - σ(0.7)) = 2·(1 - 0.6681878) = 0.6636245. Rewards β·r = (0.5, -0.5).
    losses, rewards = kto_loss(torch.tensor([-3.0, -4.0]), torch.tensor([-4.0, -3.0]), torch.tensor([True, False]),
                               torch.tensor(0.4), beta=0.5, undesirable_weight=2.0)
    assert losses.tolist() == pytest.approx([0.4255575, 0.6636245], abs=1e-6)
    assert rewards.tolist() == pytest.approx([0.5, -0.5], abs=1e-7)


def test_kto_kl_is_clamped_and_not_differentiated() -> None:
    policy = torch.tensor([-2.0, -3.0, -1.0], requires_grad=True)
    ref = torch.tensor([-2.5, -2.0, -1.0])
    desirable = torch.tensor([1, 0, 1])  # 0/1 integers work like bools
    kl = torch.tensor(0.8, requires_grad=True)
    losses, rewards = kto_loss(policy, ref, desirable, kl, beta=1.0)
    losses.sum().backward()
    assert kl.grad is None  # the reference point is a constant of the loss
    assert policy.grad.abs().min() > 0
    assert not rewards.requires_grad
    negative, _ = kto_loss(policy, ref, desirable, -5.0, beta=1.0)
    zero, _ = kto_loss(policy, ref, desirable, 0.0, beta=1.0)
    assert torch.equal(negative, zero)
    assert not torch.allclose(negative, losses)


def test_kto_loss_input_checks() -> None:
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="same B"):
        kto_loss(x, torch.zeros(4), torch.ones(3, dtype=torch.bool), 0.0, beta=0.1)
    with pytest.raises(ValueError, match="bool or 0/1"):
        kto_loss(x, x, torch.ones(3), 0.0, beta=0.1)
    with pytest.raises(ValueError, match="kl must be a scalar"):
        kto_loss(x, x, torch.ones(3, dtype=torch.bool), torch.zeros(3), beta=0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        kto_loss(x, x, torch.ones(3, dtype=torch.bool), 0.0, beta=0.0)


# ----------------------------------------------------------------------------------------------- ORPO


@pytest.mark.parametrize("n", [1, 4, 33])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_loss_matches_naive_loop(n: int, beta: float) -> None:
    chosen, rejected = _logps(n, n), _logps(n + 100, n)
    losses, log_odds = orpo_loss(chosen, rejected, beta=beta)
    for i in range(n):
        c, r = float(chosen[i]), float(rejected[i])
        lo = (c - r) - (_log1mexp(c) - _log1mexp(r))
        assert log_odds[i].item() == pytest.approx(lo, rel=1e-10, abs=1e-10)
        assert losses[i].item() == pytest.approx(-beta * _log_sigmoid(lo), rel=1e-10, abs=1e-12)


def test_orpo_loss_hand_values() -> None:
    # P_c = 1/2 -> odds 1; P_r = 1/4 -> odds 1/3; log OR = ln 3 = 1.0986123;
    # loss = -β·log σ(ln 3) = -β·ln(3/4) = 0.1·0.2876821 = 0.02876821.
    losses, log_odds = orpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]), beta=0.1)
    assert log_odds.item() == pytest.approx(math.log(3), abs=1e-6)
    assert losses.item() == pytest.approx(0.02876821, abs=1e-7)


def test_orpo_log1mexp_is_stable_in_float32() -> None:
    # Near 0, log(1 - exp(x)) in float32 rounds 1 - exp(-1e-8) to 0 (-inf); log(-expm1(x)) keeps it.
    chosen = torch.tensor([-1e-8, -1e-3, -0.6931, -0.6932, -30.0])
    rejected = torch.full_like(chosen, -1.0)
    _, log_odds = orpo_loss(chosen, rejected, beta=1.0)
    naive_f32 = (chosen - rejected) - (torch.log(1 - torch.exp(chosen)) - torch.log(1 - torch.exp(rejected)))
    assert not torch.isfinite(naive_f32[0])  # so the test below really exercises the stable form
    expected = [(c - -1.0) - (_log1mexp(c) - _log1mexp(-1.0)) for c in chosen.double().tolist()]
    assert torch.isfinite(log_odds).all()
    assert log_odds.tolist() == pytest.approx(expected, rel=1e-5)


def test_orpo_gradient_is_finite_near_zero() -> None:
    chosen = torch.tensor([-1e-6, -0.5, -10.0], requires_grad=True)
    losses, _ = orpo_loss(chosen, torch.tensor([-2.0, -0.7, -0.1]), beta=0.5)
    losses.sum().backward()
    assert torch.isfinite(chosen.grad).all()
    assert (chosen.grad < 0).all()  # raising the chosen log-prob lowers the loss


def test_orpo_loss_input_checks() -> None:
    with pytest.raises(ValueError, match="<= 0"):
        orpo_loss(torch.tensor([0.5]), torch.tensor([-1.0]), beta=0.1)
    with pytest.raises(ValueError, match="same B"):
        orpo_loss(torch.zeros(2) - 1, torch.zeros(3) - 1, beta=0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        orpo_loss(torch.zeros(2) - 1, torch.zeros(2) - 1, beta=0.0)


# ---------------------------------------------------------------------------------------------- SimPO


@pytest.mark.parametrize("n", [1, 6, 20])
@pytest.mark.parametrize(("beta", "gamma", "eps"), [(2.0, 0.5, 0.0), (10.0, 3.0, 0.1), (2.5, 0.0, 0.3)])
def test_simpo_loss_matches_naive_loop(n: int, beta: float, gamma: float, eps: float) -> None:
    chosen, rejected = _logps(n + 7, n), _logps(n + 8, n)
    losses = simpo_loss(chosen, rejected, beta=beta, gamma=gamma, label_smoothing=eps)
    for i in range(n):
        z = float(chosen[i] - rejected[i]) - gamma / beta
        expected = -(1 - eps) * _log_sigmoid(beta * z) - eps * _log_sigmoid(-beta * z)
        assert losses[i].item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_simpo_loss_hand_values() -> None:
    # c = -0.5, r = -1, β = 2, γ = 0.5: z = 0.5 - 0.25 = 0.25, βz = 0.5,
    # -log σ(0.5) = log(1 + e^-0.5) = 0.4740770; with ε = 0.1: 0.9·0.4740770 + 0.1·(-log σ(-0.5) = 0.9740770)
    # = 0.4266693 + 0.0974077 = 0.5240770.
    c, r = torch.tensor([-0.5]), torch.tensor([-1.0])
    assert simpo_loss(c, r, beta=2.0, gamma=0.5).item() == pytest.approx(0.4740770, abs=1e-6)
    assert simpo_loss(c, r, beta=2.0, gamma=0.5, label_smoothing=0.1).item() == pytest.approx(0.5240770, abs=1e-6)


def test_simpo_without_margin_is_dpo_without_reference() -> None:
    # γ = 0 and a reference giving log π_ref = 0 everywhere turn SimPO into (c)DPO on the same inputs.
    c, r = _logps(1, 8), _logps(2, 8)
    zeros = torch.zeros(8, dtype=torch.float64)
    dpo, _, _ = dpo_loss(c, r, zeros, zeros, beta=2.0, label_smoothing=0.1)
    assert torch.allclose(simpo_loss(c, r, beta=2.0, gamma=0.0, label_smoothing=0.1), dpo, atol=1e-12)
    assert not torch.allclose(simpo_loss(c, r, beta=2.0, gamma=1.0, label_smoothing=0.1), dpo, atol=1e-3)


def test_simpo_loss_input_checks() -> None:
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="label_smoothing"):
        simpo_loss(x, x, beta=1.0, gamma=0.5, label_smoothing=0.5)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        simpo_loss(x, x, beta=1.0, gamma=-0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        simpo_loss(x, x, beta=0.0, gamma=0.5)
    with pytest.raises(ValueError, match="same B"):
        simpo_loss(x, torch.zeros(2, 1), beta=1.0, gamma=0.5)
