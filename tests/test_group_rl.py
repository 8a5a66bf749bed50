"""GRPO/RLOO advantages and the GRPO loss against naive per-row loops and hand-computed cases.

TRL 1.16 parity is in tests/test_trl_reference_grpo_offline.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_core.rl import GRPO_LOSS_TYPES, group_advantages, grpo_loss, rloo_advantages


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ advantages


def _naive_group_adv(rewards: list[float], k: int, scale: str, eps: float) -> list[float]:
    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    def std(xs: list[float]) -> float:  # Bessel-corrected
        mu = mean(xs)
        return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))

    out = []
    for g in range(len(rewards) // k):
        group = rewards[g * k : (g + 1) * k]
        for r in group:
            a = r - mean(group)
            if scale == "group":
                a /= std(group) + eps
            elif scale == "batch":
                a /= std(rewards) + eps
            out.append(a)
    return out


def _naive_rloo_adv(rewards: list[float], k: int) -> list[float]:
    out = []
    for g in range(len(rewards) // k):
        group = rewards[g * k : (g + 1) * k]
        for i, r in enumerate(group):
            others = group[:i] + group[i + 1 :]
            out.append(r - sum(others) / len(others))
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize(("groups", "k"), [(1, 2), (3, 4), (5, 3), (2, 8)])
def test_group_advantages_match_naive_loop(scale: str, groups: int, k: int) -> None:
    rewards = torch.randn(groups * k, generator=_gen(groups * 10 + k), dtype=torch.float64) * 3
    expected = _naive_group_adv(rewards.tolist(), k, scale, eps=1e-4)
    assert group_advantages(rewards, k, scale=scale).tolist() == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize(("groups", "k"), [(1, 2), (3, 4), (5, 3), (2, 8)])
def test_rloo_advantages_match_naive_loop(groups: int, k: int) -> None:
    rewards = torch.randn(groups * k, generator=_gen(groups * 10 + k + 1), dtype=torch.float64)
    expected = _naive_rloo_adv(rewards.tolist(), k)
    assert rloo_advantages(rewards, k).tolist() == pytest.approx(expected, abs=1e-12)


REWARDS = [1.0, 2.0, 3.0, 4.0, 0.0, 0.0]  # two prompts, k = 3


def test_group_advantages_hand_values() -> None:
    r = torch.tensor(REWARDS, dtype=torch.float64)
    # Group 1 (1, 2, 3): mean 2, Bessel std sqrt((1 + 0 + 1)/2) = 1 -> (-1, 0, 1).
    # Group 2 (4, 0, 0): mean 4/3, deviations (8/3, -4/3, -4/3), var (64+16+16)/9/2 = 16/3, std 4/sqrt(3)
    #   -> (8/3)/(4/sqrt(3)) = 2/sqrt(3) = 1.1547005, (-4/3)/(4/sqrt(3)) = -1/sqrt(3) = -0.5773503.
    group = [-1.0, 0.0, 1.0, 1.1547005, -0.5773503, -0.5773503]
    assert group_advantages(r, 3, eps=0.0).tolist() == pytest.approx(group, abs=1e-7)
    # Batch: mean 5/3, squared deviations (4 + 1 + 16 + 49 + 25 + 25)/9 = 120/9, / 5 -> var 8/3,
    # std sqrt(8/3) = 1.6329932; the group-centred values (-1, 0, 1, 8/3, -4/3, -4/3) divided by it.
    batch = [-0.6123724, 0.0, 0.6123724, 1.6329932, -0.8164966, -0.8164966]
    assert group_advantages(r, 3, scale="batch", eps=0.0).tolist() == pytest.approx(batch, abs=1e-7)
    none = [-1.0, 0.0, 1.0, 8 / 3, -4 / 3, -4 / 3]
    assert group_advantages(r, 3, scale="none").tolist() == pytest.approx(none, abs=1e-12)
    # Default eps = 1e-4 is in the divisor: -1 / (1 + 1e-4) = -0.99990001.
    assert group_advantages(r, 3)[0].item() == pytest.approx(-0.99990001, abs=1e-8)


def test_rloo_advantages_hand_values() -> None:
    # 1 - (2+3)/2 = -1.5, 2 - (1+3)/2 = 0, 3 - (1+2)/2 = 1.5; 4 - 0 = 4, 0 - (4+0)/2 = -2 (twice).
    out = rloo_advantages(torch.tensor(REWARDS), 3)
    assert out.tolist() == pytest.approx([-1.5, 0.0, 1.5, 4.0, -2.0, -2.0], abs=1e-6)


def test_equal_rewards_give_zero_advantage_not_nan() -> None:
    r = torch.tensor([0.5, 0.5, 0.5, 1.0, 2.0, 3.0])
    adv = group_advantages(r, 3)
    assert torch.isfinite(adv).all()
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    assert rloo_advantages(r, 3)[:3].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("fn", [group_advantages, rloo_advantages])
def test_advantage_input_checks(fn) -> None:
    with pytest.raises(ValueError, match="multiple of group_size"):
        fn(torch.zeros(7), 3)
    with pytest.raises(ValueError, match="group_size must be an int >= 2"):
        fn(torch.zeros(6), 1)
    with pytest.raises(ValueError, match=r"must be \(B,\)"):
        fn(torch.zeros(2, 3), 3)
    with pytest.raises(ValueError, match="unknown scale 'std'.*'group', 'batch', 'none'"):
        group_advantages(torch.zeros(6), 3, scale="std")


# ------------------------------------------------------------------------------ grpo_loss


def _batch(seed: int, b: int = 6, t: int = 7, garbage: bool = True) -> dict[str, torch.Tensor]:
    """Random log-probs, ratios wide enough to clip on both sides, and padded rows."""
    g = _gen(seed)
    logps = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = logps + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    ref = logps + 0.5 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.zeros(b, t, dtype=torch.long)
    lengths = [t, 1] + [int(x) for x in torch.randint(1, t + 1, (b - 2,), generator=g)]
    for row, n in enumerate(lengths):
        mask[row, :n] = 1  # completion then right padding, as after EOS
    if garbage:  # what a model computes at padding can be anything; it must not matter
        logps = torch.where(mask.bool(), logps, torch.full_like(logps, -1e4))
        old = torch.where(mask.bool(), old, torch.full_like(old, float("-inf")))
    return {"logps": logps, "old_logps": old, "ref_logps": ref, "advantages": adv, "mask": mask}


def _naive_grpo(batch: dict, *, eps_low: float, eps_high: float, loss_type: str, beta: float,
                max_len: int | None) -> tuple[float, float]:
    """(loss, clipped fraction) from the per-token formula, one token at a time."""
    b, t = batch["mask"].shape
    rows, total, count, clipped = [], 0.0, 0, 0
    for i in range(b):
        a = float(batch["advantages"][i])
        row_sum, row_n = 0.0, 0
        for j in range(t):
            if not batch["mask"][i, j]:
                continue
            lp, old, ref = (float(batch[k][i, j]) for k in ("logps", "old_logps", "ref_logps"))
            rho = math.exp(lp - old)
            rho_c = min(max(rho, 1 - eps_low), 1 + eps_high)
            loss = -min(rho * a, rho_c * a)
            if beta:
                loss += beta * (math.exp(ref - lp) - (ref - lp) - 1)
            clipped += (rho < 1 - eps_low and a < 0) or (rho > 1 + eps_high and a > 0)
            row_sum, row_n = row_sum + loss, row_n + 1
        rows.append(row_sum / row_n)
        total, count = total + row_sum, count + row_n
    if loss_type == "grpo":
        value = sum(rows) / b
    elif loss_type in ("bnpo", "dapo"):
        value = total / count
    else:
        value = total / (b * (max_len or t))
    return value, clipped / count


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize(("beta", "eps_high", "max_len"), [(0.0, None, None), (0.04, 0.28, 12), (0.5, 0.1, None)])
@pytest.mark.parametrize("shape", [(6, 7), (3, 1), (9, 4)])
def test_grpo_loss_matches_naive_loop(loss_type: str, beta: float, eps_high: float | None,
                                      max_len: int | None, shape: tuple[int, int]) -> None:
    batch = _batch(seed=sum(shape) + int(beta * 100), b=shape[0], t=shape[1])
    loss, stats = grpo_loss(
        batch["logps"], batch["old_logps"], batch["advantages"], batch["mask"],
        epsilon_low=0.2, epsilon_high=eps_high, loss_type=loss_type,
        ref_logps=batch["ref_logps"] if beta else None, beta=beta, max_completion_length=max_len,
    )
    expected, clipfrac = _naive_grpo(batch, eps_low=0.2, eps_high=0.2 if eps_high is None else eps_high,
                                     loss_type=loss_type, beta=beta, max_len=max_len)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(expected, abs=1e-10)
    assert stats["clipfrac"].item() == pytest.approx(clipfrac, abs=1e-12)


def test_grpo_loss_hand_values() -> None:
    # A = (1, -1), ε = 0.2; row 0 has two tokens, row 1 one (then padding).
    # Row 0: ρ = 1.5 -> min(1.5, 1.2)·1 = 1.2, ℓ = -1.2 (clipped high); ρ = 0.9 -> ℓ = -0.9.
    # Row 1: ρ = 0.5 -> min(-0.5, -0.8) = -0.8, ℓ = 0.8 (clipped low).
    lr = torch.tensor([[math.log(1.5), math.log(0.9)], [math.log(0.5), 0.0]])
    old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    cases = {
        "grpo": ((-1.2 - 0.9) / 2 + 0.8) / 2,  # mean of row means (-1.05, 0.8) = -0.125
        "bnpo": (-1.2 - 0.9 + 0.8) / 3,  # -1.3 / 3 tokens
        "dapo": (-1.2 - 0.9 + 0.8) / 3,
        "dr_grpo": (-1.2 - 0.9 + 0.8) / (2 * 4),  # B · max_completion_length = 8
    }
    for loss_type, expected in cases.items():
        loss, stats = grpo_loss(lr, old, adv, mask, loss_type=loss_type, max_completion_length=4)
        assert loss.item() == pytest.approx(expected, abs=1e-6), loss_type
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["clipfrac_low"].item() == pytest.approx(1 / 3)
    assert stats["clipfrac_high"].item() == pytest.approx(1 / 3)
    assert stats["kl"].item() == 0.0  # no reference given
    # KL: ref − logp = (0, ln 2 | −ln 2): k3 = 0, 2 − ln 2 − 1 = 0.3068528, 0.5 + ln 2 − 1 = 0.1931472,
    # total 0.5 over 3 tokens; β = 0.5 -> bnpo (-1.3 + 0.25) / 3 = -0.35, mean KL 1/6.
    ref = lr + torch.tensor([[0.0, math.log(2)], [-math.log(2), 0.0]])
    loss, stats = grpo_loss(lr, old, adv, mask, loss_type="bnpo", ref_logps=ref, beta=0.5)
    assert loss.item() == pytest.approx(-0.35, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(1 / 6, abs=1e-6)


def test_grpo_loss_gradient_is_finite_and_zero_on_padding() -> None:
    batch = _batch(seed=3)
    logps = batch["logps"].clone().requires_grad_(True)
    loss, _ = grpo_loss(logps, batch["old_logps"], batch["advantages"], batch["mask"],
                        ref_logps=batch["ref_logps"], beta=0.1)
    loss.backward()
    pad = batch["mask"] == 0
    assert torch.isfinite(logps.grad).all()
    assert logps.grad[pad].abs().sum() == 0
    assert logps.grad[~pad].abs().sum() > 0


def test_grpo_loss_on_policy_gradient_is_minus_advantage_weighted() -> None:
    # At ρ = 1 (first step on fresh samples) clipping is inactive and ∂ℓ/∂logp = −A per token;
    # bnpo divides by the 3 tokens.
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    loss, _ = grpo_loss(logps, logps.detach(), torch.tensor([2.0, -1.0]), torch.tensor([[1, 1], [1, 0]]),
                        loss_type="bnpo")
    loss.backward()
    assert logps.grad.flatten().tolist() == pytest.approx([-2 / 3, -2 / 3, 1 / 3, 0.0])


def test_grpo_epsilon_high_defaults_to_epsilon_low() -> None:
    batch = _batch(seed=5, garbage=False)
    args = (batch["logps"], batch["old_logps"], batch["advantages"], batch["mask"])
    default, _ = grpo_loss(*args, epsilon_low=0.2)
    symmetric, _ = grpo_loss(*args, epsilon_low=0.2, epsilon_high=0.2)
    higher, _ = grpo_loss(*args, epsilon_low=0.2, epsilon_high=0.28)
    assert default.item() == symmetric.item()
    assert abs(default.item() - higher.item()) > 1e-6  # the upper bound really was reached


def test_grpo_loss_input_checks() -> None:
    b = _batch(seed=1, garbage=False)
    args = (b["logps"], b["old_logps"], b["advantages"], b["mask"])
    with pytest.raises(ValueError, match=r"unknown loss_type 'ppo'; valid: \['grpo', 'bnpo', 'dapo', 'dr_grpo'\]"):
        grpo_loss(*args, loss_type="ppo")
    with pytest.raises(ValueError, match="needs ref_logps"):
        grpo_loss(*args, beta=0.1)
    with pytest.raises(ValueError, match="same shape"):
        grpo_loss(b["logps"], b["old_logps"][:, :-1], b["advantages"], b["mask"])
    with pytest.raises(ValueError, match=r"advantages must be \(B,\)"):
        grpo_loss(b["logps"], b["old_logps"], b["advantages"][:, None], b["mask"])
    with pytest.raises(ValueError, match="no completion token"):
        grpo_loss(b["logps"], b["old_logps"], b["advantages"], torch.zeros_like(b["mask"]))
    with pytest.raises(ValueError, match="must be > 0"):
        grpo_loss(*args, epsilon_low=0.0)


def test_the_grpo_config_accepts_exactly_the_loss_types_grpo_loss_knows():
    from rlhf_core.trainers.grpo.config import LOSS_TYPES  # torch-free, for the preflight: a list of its own

    assert sorted(LOSS_TYPES) == sorted(GRPO_LOSS_TYPES)
