"""Tests for rlhf_core.rl: each function against a naive per-token loop and hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_core.rl import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    compute_rewards,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)

B, T = 6, 9


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(seed: int, shape: tuple[int, ...] = (B, T)) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


def _blocks(seed: int, b: int = B, t: int = T) -> list[tuple[int, int]]:
    """Per row a response block [start, end): some rows with left zeros, some with right zeros."""
    g = _gen(seed)
    rows = [(0, t), (2, t), (0, t - 3), (3, t - 2), (t - 1, t)]  # full, left, right, both, one
    while len(rows) < b:
        start = int(torch.randint(0, t - 1, (1,), generator=g))
        end = int(torch.randint(start + 1, t + 1, (1,), generator=g))
        rows.append((start, end))
    return rows[:b]


def _mask(blocks: list[tuple[int, int]], t: int = T) -> torch.Tensor:
    mask = torch.zeros(len(blocks), t, dtype=torch.long)
    for row, (start, end) in enumerate(blocks):
        mask[row, start:end] = 1
    return mask


def _selected(x: torch.Tensor, mask: torch.Tensor) -> list[float]:
    return [float(x[i, j]) for i in range(x.shape[0]) for j in range(x.shape[1]) if mask[i, j]]


# ---------------------------------------------------------------- kl_penalty


def test_kl_estimators_hand_values():
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]])
    ln2 = math.log(2.0)
    # d = logp - ref = [ln 2, -ln 2];  r = ref/p = [1/2, 2]
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([[ln2, -ln2]]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([[ln2**2 / 2] * 2]))
    # k3 = (r - 1) - log r
    expected_k3 = torch.tensor([[0.5 - 1 + ln2, 2 - 1 - ln2]])
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), expected_k3)
    assert torch.equal(kl_penalty(logp, ref), kl_penalty(logp, ref, "k1"))  # k1 is the default


def test_ppo_config_accepts_exactly_the_kl_estimators():
    from typing import get_args

    from rlhf_core.rl import KL_ESTIMATORS
    from rlhf_core.trainers.ppo.config import KLEstimator

    assert sorted(get_args(KLEstimator)) == sorted(KL_ESTIMATORS)  # the config's torch-free names are the registry's keys


def test_k2_k3_nonnegative_on_random_inputs():
    logp, ref = 3 * _randn(0, (64, 32)), 3 * _randn(1, (64, 32))
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert (kl_penalty(logp, ref, "k2") >= 0).all()
    assert (kl_penalty(logp, ref, "k1") < 0).any()  # k1 alone can be negative per token


def test_k1_and_k3_estimate_the_true_kl():
    """Averaged over samples of π, k1 and k3 approach KL(π ‖ π_ref) (they are unbiased)."""
    p = torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.1, 0.3, 0.3, 0.3], dtype=torch.float64)
    true_kl = float((p * (p / q).log()).sum())
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=_gen(2))
    logp, ref = p.log()[tokens][None], q.log()[tokens][None]  # (1, N)
    for name in ("k1", "k3"):
        assert float(kl_penalty(logp, ref, name).mean()) == pytest.approx(true_kl, rel=0.03)


def test_kl_unknown_estimator_lists_known_ones():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        kl_penalty(x, x, "k4")


# ---------------------------------------------------------------- masked statistics


def test_masked_mean_matches_loop():
    x, mask = _randn(3), _mask(_blocks(3))
    vals = _selected(x, mask)
    assert float(masked_mean(x, mask)) == pytest.approx(sum(vals) / len(vals))
    per_row = masked_mean(x, mask, dim=1)
    for i in range(B):
        row = [float(x[i, j]) for j in range(T) if mask[i, j]]
        assert float(per_row[i]) == pytest.approx(sum(row) / len(row))


def test_masked_mean_ignores_nonfinite_padding_and_handles_empty():
    x = torch.tensor([[1.0, 3.0, float("inf")], [float("nan"), 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert float(masked_mean(x, mask)) == 2.0
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([2.0, 0.0]))
    with pytest.raises(ValueError, match="no unmasked"):
        masked_mean(x, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="same shape"):
        masked_mean(x, mask[:, :2])


def test_masked_var_matches_loop():
    x, mask = _randn(4), _mask(_blocks(4))
    vals = _selected(x, mask)
    n, mu = len(vals), sum(vals) / len(vals)
    ss = sum((v - mu) ** 2 for v in vals)
    assert float(masked_var(x, mask)) == pytest.approx(ss / n)
    assert float(masked_var(x, mask, unbiased=True)) == pytest.approx(ss / (n - 1))


def test_masked_whiten_has_mean_0_and_biased_std_1():
    x, mask = 5 + 3 * _randn(5), _mask(_blocks(5))
    white = masked_whiten(x, mask)
    vals = _selected(white, mask)
    mu = sum(vals) / len(vals)
    assert mu == pytest.approx(0.0, abs=1e-9)
    assert math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals)) == pytest.approx(1.0, rel=1e-6)
    assert (white[mask == 0] == 0).all()  # padding is zeroed, not whitened


def test_masked_whiten_without_shift_keeps_the_mean():
    x, mask = 5 + 3 * _randn(6), _mask(_blocks(6))
    original = _selected(x, mask)
    kept = _selected(masked_whiten(x, mask, shift_mean=False), mask)
    mu, mu_kept = sum(original) / len(original), sum(kept) / len(kept)
    assert mu_kept == pytest.approx(mu)
    assert math.sqrt(sum((v - mu_kept) ** 2 for v in kept) / len(kept)) == pytest.approx(1.0)


# ---------------------------------------------------------------- compute_rewards


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_compute_rewards_matches_loop(estimator):
    blocks = _blocks(7)
    mask, logp, ref, scores = _mask(blocks), _randn(8), _randn(9), _randn(10, (B,))
    beta = 0.3
    rewards, kl = compute_rewards(scores, logp, ref, mask, beta, estimator)
    for i, (start, end) in enumerate(blocks):
        for j in range(T):
            d = float(logp[i, j] - ref[i, j])
            k = (d if estimator == "k1" else math.exp(-d) - 1 + d) if start <= j < end else 0.0
            expected = -beta * k + (float(scores[i]) if j == end - 1 else 0.0)
            assert float(kl[i, j]) == pytest.approx(k)
            assert float(rewards[i, j]) == pytest.approx(expected)


def test_compute_rewards_puts_score_at_last_unmasked_token():
    zeros = torch.zeros(3, 5)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 0]])
    rewards, kl = compute_rewards(torch.tensor([2.0, -1.0, 7.0]), zeros, zeros, mask, 0.1)
    expected = torch.tensor([[0, 0, 2.0, 0, 0], [0, 0, 0, 0, -1.0], [0, 0, 0, 7.0, 0]])
    torch.testing.assert_close(rewards, expected)
    assert (kl == 0).all()


def test_compute_rewards_rejects_empty_rows_and_bad_scores():
    zeros = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        compute_rewards(torch.zeros(2), zeros, zeros, torch.tensor([[1, 1, 0], [0, 0, 0]]), 0.1)
    with pytest.raises(ValueError, match="scores"):
        compute_rewards(torch.zeros(2, 1), zeros, zeros, torch.ones(2, 3), 0.1)


# ---------------------------------------------------------------- compute_gae


def _gae_reference(rewards, values, blocks, gamma, lam):
    """Non-recursive GAE (Schulman et al. 2016 Eq. 16): A_t = Σ_l (γλ)^l δ_{t+l} inside the block."""
    adv = torch.zeros_like(rewards)
    for i, (start, end) in enumerate(blocks):
        r = [float(v) for v in rewards[i, start:end]]
        v = [float(x) for x in values[i, start:end]] + [0.0]  # V past EOS is 0
        deltas = [r[k] + gamma * v[k + 1] - v[k] for k in range(len(r))]
        for k in range(len(r)):
            adv[i, start + k] = sum((gamma * lam) ** j * deltas[k + j] for j in range(len(r) - k))
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_compute_gae_matches_reference(gamma, lam):
    blocks = _blocks(11)
    mask, rewards, values = _mask(blocks), _randn(12), _randn(13)
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    expected = _gae_reference(rewards, values, blocks, gamma, lam)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, torch.where(mask.bool(), expected + values, 0.0))


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[9.0, 1.0, 2.0, 3.0, 9.0]])  # 9s are outside the response
    values = torch.tensor([[9.0, 0.5, 1.0, -1.0, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 6 - 0.5, 5 - 1.0, 3 + 1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, 6.0, 5.0, 3.0, 0.0]]))


def test_gae_with_lambda_zero_is_one_step_td_error():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 5.0]])
    values = torch.tensor([[0.5, 1.0, -1.0, 7.0]])  # last value is padding: never bootstrapped
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, _ = compute_gae(rewards, values, mask, gamma=0.5, lam=0.0)
    expected = [1 + 0.5 * 1.0 - 0.5, 2 + 0.5 * -1.0 - 1.0, 3 + 0.0 + 1.0, 0.0]
    torch.testing.assert_close(adv, torch.tensor([expected]))


def test_gae_ignores_padding_values_and_rewards():
    blocks = _blocks(14)
    mask, rewards, values = _mask(blocks), _randn(15), _randn(16)
    noisy = mask == 0
    adv, ret = compute_gae(rewards, values, mask, 1.0, 0.95)
    adv2, ret2 = compute_gae(
        torch.where(noisy, 1e6, rewards), torch.where(noisy, -1e6, values), mask, 1.0, 0.95
    )
    torch.testing.assert_close(adv, adv2)
    torch.testing.assert_close(ret, ret2)
    assert (adv[noisy] == 0).all() and (ret[noisy] == 0).all()


def test_gae_rejects_gappy_masks_and_bad_gamma():
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        compute_gae(x, x, torch.tensor([[0, 1, 1, 0], [1, 0, 1, 0]]), 1.0, 0.95)
    with pytest.raises(ValueError, match="gamma"):
        compute_gae(x, x, torch.ones(2, 4), 1.5, 0.95)


# ---------------------------------------------------------------- PPO losses


def test_policy_loss_matches_loop():
    mask, logp, old, adv = _mask(_blocks(17)), 0.3 * _randn(18), 0.3 * _randn(19), _randn(20)
    eps = 0.2
    loss, stats = ppo_policy_loss(logp, old, adv, mask, eps)
    losses, clipped, sq = [], [], []
    for i in range(B):
        for j in range(T):
            if mask[i, j]:
                ratio = math.exp(float(logp[i, j] - old[i, j]))
                a = float(adv[i, j])
                plain, clip = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
                losses.append(max(plain, clip))
                clipped.append(float(clip > plain))
                sq.append(float(logp[i, j] - old[i, j]) ** 2)
    assert float(loss) == pytest.approx(sum(losses) / len(losses))
    assert float(stats["clipfrac"]) == pytest.approx(sum(clipped) / len(clipped))
    assert float(stats["approxkl"]) == pytest.approx(0.5 * sum(sq) / len(sq))
    assert 0 < float(stats["clipfrac"]) < 1  # the random case exercises both branches


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    mask, logp, adv = _mask(_blocks(21)), _randn(22), _randn(23)
    loss, stats = ppo_policy_loss(logp, logp.clone(), adv, mask, 0.2)
    vals = _selected(adv, mask)
    assert float(loss) == pytest.approx(-sum(vals) / len(vals))
    assert float(stats["clipfrac"]) == 0.0
    assert float(stats["approxkl"]) == 0.0
    assert float(stats["ratio_mean"]) == pytest.approx(1.0)


def test_policy_loss_clips_outside_the_band():
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])  # last token is padding
    logp = ratios.log().requires_grad_()
    loss, stats = ppo_policy_loss(logp, torch.zeros_like(logp), adv, mask, clip_range=0.2)
    # per token max(-A·ρ, -A·clip(ρ)): max(-1.5,-1.2), max(-0.5,-0.8), max(0.5,0.8), max(1.5,1.2)
    assert float(loss.detach()) == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4)
    assert float(stats["clipfrac"]) == pytest.approx(0.5)  # tokens 0 and 2
    assert float(stats["ratio_mean"]) == pytest.approx(1.0)
    expected_kl = 0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4
    assert float(stats["approxkl"]) == pytest.approx(expected_kl)
    loss.backward()
    # clipped tokens and padding get no gradient; others get d(-A·ρ)/d logp / n = -A·ρ / 4
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5 / 4, 0.0, 1.5 / 4, 0.0]]))


def test_policy_loss_is_finite_with_garbage_in_padding():
    logp = torch.tensor([[-1.0, float("-inf")]], requires_grad=True)
    old = torch.tensor([[-1.2, 50.0]])
    loss, _ = ppo_policy_loss(logp, old, torch.ones(1, 2), torch.tensor([[1, 0]]), 0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()


def test_policy_loss_learns_a_bandit():
    """A few PPO epochs on one batch move probability toward the positive-advantage action."""
    logits = torch.zeros(4, requires_grad=True)
    actions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    adv = torch.where(actions == 0, 1.0, -1 / 3)
    old = torch.log_softmax(logits, -1).detach()[actions]
    optim = torch.optim.SGD([logits], lr=0.5)
    for _ in range(20):
        loss, stats = ppo_policy_loss(
            torch.log_softmax(logits, -1)[actions], old, adv, torch.ones_like(adv), 0.2
        )
        optim.zero_grad()
        loss.backward()
        optim.step()
    probs = torch.softmax(logits.detach(), -1)
    assert float(probs[0]) > 0.25 + 0.05
    # once every token's ratio has left the band in its advantage's direction, PPO stops
    assert float(stats["clipfrac"]) == 1.0 and float(logits.grad.abs().max()) == 0.0


def test_value_loss_hand_case_with_clipping():
    old = torch.zeros(1, 4)
    values = torch.tensor([[1.0, 0.1, -1.0, 5.0]])
    returns = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = ppo_value_loss(values, old, returns, mask, clip_range_value=0.2)
    # (V-R)^2 = [0, .81, 1]; clipped V = [.2, .1, -.2] -> (Vc-R)^2 = [.64, .81, .04]
    assert float(loss) == pytest.approx(0.5 * (0.64 + 0.81 + 1.0) / 3)
    assert float(stats["clipfrac"]) == pytest.approx(1 / 3)
    assert float(stats["vpred"]) == pytest.approx(0.1 / 3)
    assert float(stats["error"]) == pytest.approx(1.81 / 3)


def test_value_loss_matches_loop():
    mask, values, old, ret = _mask(_blocks(24)), _randn(25), _randn(26), _randn(27)
    eps = 0.3
    loss, stats = ppo_value_loss(values, old, ret, mask, eps)
    terms, clipped = [], []
    for i in range(B):
        for j in range(T):
            if mask[i, j]:
                v, o, r = float(values[i, j]), float(old[i, j]), float(ret[i, j])
                vc = o + min(max(v - o, -eps), eps)
                terms.append(0.5 * max((v - r) ** 2, (vc - r) ** 2))
                clipped.append(float((vc - r) ** 2 > (v - r) ** 2))
    assert float(loss) == pytest.approx(sum(terms) / len(terms))
    assert float(stats["clipfrac"]) == pytest.approx(sum(clipped) / len(clipped))


# ---------------------------------------------------------------- KL controllers


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 64)
    assert ctl.value == 0.05


def test_adaptive_kl_controller_direction_and_clip():
    n, horizon, target = 64, 1000, 6.0
    up, down, same = (AdaptiveKLController(0.1, target, horizon) for _ in range(3))
    up.update(7.0, n)  # KL above target: raise β
    down.update(5.0, n)  # below: lower β
    same.update(target, n)
    assert up.value > 0.1 > down.value
    assert same.value == pytest.approx(0.1)
    assert up.value == pytest.approx(0.1 * (1 + (7 / 6 - 1) * n / horizon))  # inside the clip
    far_up, far_down = AdaptiveKLController(0.1, target, horizon), AdaptiveKLController(
        0.1, target, horizon
    )
    far_up.update(1e6, n)
    far_down.update(0.0, n)
    assert far_up.value == pytest.approx(0.1 * (1 + 0.2 * n / horizon))  # e clipped at +0.2
    assert far_down.value == pytest.approx(0.1 * (1 - 0.2 * n / horizon))  # e clipped at -0.2


def test_kl_controllers_state_dict_round_trip():
    ctl = AdaptiveKLController(0.2, 4.0, 500)
    for kl in (9.0, 1.0, 6.0):
        ctl.update(kl, 32)
    resumed = AdaptiveKLController(0.2, 4.0, 500)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value != 0.2
    ctl.update(5.0, 32)
    resumed.update(5.0, 32)
    assert resumed.value == ctl.value
    fixed = FixedKLController(0.0)
    fixed.load_state_dict(FixedKLController(0.3).state_dict())
    assert fixed.value == 0.3
    with pytest.raises(ValueError, match="value"):
        resumed.load_state_dict({})
