"""rlhf_core.losses against naive Python loops, hand-computed values and torch's own cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_core.losses import DPO_LOSSES, dpo_loss, reward_loss, sft_loss
from rlhf_core.trainers.train_config import DPO_LOSS_TYPES, DPOConfig

LN2 = math.log(2.0)


def _log_sigmoid(x: float) -> float:
    """Plain-math log σ(x), stable for either sign."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _naive_dpo(delta: float, beta: float, eps: float, loss_type: str) -> float:
    """Each DPO variant written out from its paper, one pair at a time."""
    if loss_type == "sigmoid":
        return -(1 - eps) * _log_sigmoid(beta * delta) - eps * _log_sigmoid(-beta * delta)
    if loss_type == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return max(0.0, 1 - beta * delta)
    if loss_type == "robust":
        return (-(1 - eps) * _log_sigmoid(beta * delta) + eps * _log_sigmoid(-beta * delta)) / (1 - 2 * eps)
    raise AssertionError(loss_type)


# ------------------------------------------------------------------------------------------------ SFT


def _sft_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, 7, generator=g)
    labels = torch.randint(0, 7, (3, 5), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    labels = labels.masked_fill(~mask, -100)  # as a collator leaves prompt and padding labels
    return logits, labels, mask


def test_sft_loss_equals_cross_entropy_with_ignore_index() -> None:
    logits, labels, mask = _sft_batch()
    expected = F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(sft_loss(logits, labels, mask), expected, atol=1e-6)


def test_sft_loss_equals_naive_loop_over_tokens() -> None:
    logits, labels, mask = _sft_batch(seed=1)
    total, count = 0.0, 0
    for b in range(3):
        for t in range(5):
            if mask[b, t]:
                row = logits[b, t].tolist()
                log_z = math.log(sum(math.exp(v) for v in row))
                total += log_z - row[int(labels[b, t])]
                count += 1
    assert sft_loss(logits, labels, mask).item() == pytest.approx(total / count, abs=1e-5)


def test_sft_loss_hand_value_uniform_logits_is_log_vocab() -> None:
    logits = torch.zeros(1, 2, 4)
    labels = torch.tensor([[3, -100]])
    mask = torch.tensor([[True, False]])
    assert sft_loss(logits, labels, mask).item() == pytest.approx(math.log(4), abs=1e-6)


def test_sft_loss_gradient_only_on_masked_in_positions() -> None:
    logits, labels, mask = _sft_batch(seed=2)
    logits.requires_grad_(True)
    sft_loss(logits, labels, mask).backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[~mask].abs().sum() == 0
    assert (logits.grad[mask].abs().sum(-1) > 0).all()


def test_sft_loss_all_masked_is_zero_not_nan() -> None:
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = sft_loss(logits, torch.full((2, 3), -100), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph


def test_sft_loss_rejects_bad_labels_and_shapes() -> None:
    logits, labels, mask = _sft_batch()
    with pytest.raises(ValueError, match="-100"):
        sft_loss(logits, labels, torch.ones_like(mask))
    with pytest.raises(ValueError, match="logits"):
        sft_loss(logits[:, :-1], labels, mask)


# -------------------------------------------------------------------------------------------- reward


def test_reward_loss_hand_value_and_naive_loop() -> None:
    chosen = torch.tensor([1.0, -0.5, 3.0, 0.0])
    rejected = torch.tensor([0.0, 0.5, -2.0, 0.0])
    losses = reward_loss(chosen, rejected)
    assert losses.shape == (4,)
    assert losses[0].item() == pytest.approx(math.log(1 + math.exp(-1.0)), abs=1e-6)  # −log σ(1)
    assert losses[3].item() == pytest.approx(LN2, abs=1e-6)  # tie: −log ½
    for i in range(4):
        assert losses[i].item() == pytest.approx(-_log_sigmoid(chosen[i].item() - rejected[i].item()), abs=1e-6)


def test_reward_loss_margin_shifts_the_gap() -> None:
    chosen, rejected = torch.tensor([2.0, 1.0]), torch.tensor([0.0, 0.0])
    margin = torch.tensor([2.0, 0.5])
    losses = reward_loss(chosen, rejected, margin)
    assert losses[0].item() == pytest.approx(LN2, abs=1e-6)  # gap 2 minus margin 2 -> tie
    assert losses[1].item() == pytest.approx(-_log_sigmoid(0.5), abs=1e-6)
    # A margin demands more separation, so the loss can only grow.
    assert (losses >= reward_loss(chosen, rejected)).all()
    assert reward_loss(chosen, rejected, 2.0)[0].item() == pytest.approx(LN2, abs=1e-6)


def test_reward_loss_is_stable_for_huge_gaps() -> None:
    losses = reward_loss(torch.tensor([-1e4, 1e4]), torch.tensor([1e4, -1e4]))
    assert torch.isfinite(losses).all()
    assert losses[0].item() == pytest.approx(2e4)
    assert losses[1].item() == pytest.approx(0.0, abs=1e-6)


def test_reward_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="chosen_rewards"):
        reward_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="margin"):
        reward_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2))


# ----------------------------------------------------------------------------------------------- DPO


def _dpo_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    pc = torch.tensor([-10.0, -4.0, -7.5, -3.0, -20.0])
    pr = torch.tensor([-12.0, -3.0, -7.5, -9.0, -18.0])
    rc = torch.tensor([-11.0, -4.5, -6.0, -3.0, -21.0])
    rr = torch.tensor([-11.0, -3.5, -8.0, -4.0, -17.0])
    return pc, pr, rc, rr


def test_registry_holds_the_documented_losses() -> None:
    assert set(DPO_LOSSES) == {"sigmoid", "ipo", "hinge", "robust"}
    # the torch-free names the dpo config accepts are the registry's keys
    assert sorted(DPO_LOSS_TYPES) == sorted(DPO_LOSSES)
    with pytest.raises(ValueError, match="loss_type 'sigmoidal'"):
        DPOConfig(loss_type="sigmoidal")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
@pytest.mark.parametrize(("beta", "eps"), [(0.1, 0.0), (0.5, 0.2)])
def test_dpo_losses_match_naive_loop(loss_type: str, beta: float, eps: float) -> None:
    pc, pr, rc, rr = _dpo_inputs()
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    for i in range(5):
        delta = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        assert losses[i].item() == pytest.approx(_naive_dpo(delta, beta, eps, loss_type), abs=1e-5)
        assert chosen_r[i].item() == pytest.approx(beta * (pc[i].item() - rc[i].item()), abs=1e-6)
        assert rejected_r[i].item() == pytest.approx(beta * (pr[i].item() - rr[i].item()), abs=1e-6)


def test_dpo_sigmoid_hand_value() -> None:
    # Δ = (−1 − (−2)) − (−3 − (−1)) = 1 + 2 = 3; β = 0.5 -> −log σ(1.5) = log(1 + e^{−1.5})
    losses, _, _ = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-1.0]), beta=0.5
    )
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1.5)), abs=1e-6)


def test_conservative_dpo_hand_value() -> None:
    # Δ = 2, β = 1, ε = 0.1: −0.9 log σ(2) − 0.1 log σ(−2)
    expected = 0.9 * math.log(1 + math.exp(-2.0)) + 0.1 * math.log(1 + math.exp(2.0))
    losses, _, _ = dpo_loss(
        torch.tensor([0.0]), torch.tensor([-2.0]), torch.tensor([0.0]), torch.tensor([0.0]),
        beta=1.0, label_smoothing=0.1,
    )
    assert losses.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [("sigmoid", LN2), ("ipo", (1 / (2 * 0.25)) ** 2), ("hinge", 1.0), ("robust", LN2)],
)
def test_dpo_with_policy_equal_to_reference(loss_type: str, expected: float) -> None:
    logps = torch.tensor([-3.0, -7.0, -1.5])
    other = torch.tensor([-5.0, -2.0, -4.0])
    eps = 0.2 if loss_type == "robust" else 0.0  # robust: ((1−2ε) ln 2) / (1−2ε) = ln 2
    losses, chosen_r, rejected_r = dpo_loss(
        logps, other, logps.clone(), other.clone(), beta=0.25, loss_type=loss_type, label_smoothing=eps
    )
    assert torch.allclose(losses, torch.full((3,), expected), atol=1e-6)
    assert (chosen_r == 0).all() and (rejected_r == 0).all()


def test_dpo_gradient_raises_chosen_and_lowers_rejected() -> None:
    pc, pr, rc, rr = _dpo_inputs()
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    losses, chosen_r, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    losses.sum().backward()
    assert (pc.grad < 0).all()  # descending the loss increases log π(y_c)
    assert (pr.grad > 0).all()  # ... and decreases log π(y_r)
    assert not chosen_r.requires_grad


def test_dpo_gradient_step_reduces_the_loss() -> None:
    pc, pr, rc, rr = _dpo_inputs()
    params = torch.stack([pc, pr]).clone().requires_grad_(True)
    before, _, _ = dpo_loss(params[0], params[1], rc, rr, beta=0.1)
    before.mean().backward()
    with torch.no_grad():
        stepped = params - 5.0 * params.grad
    after, _, _ = dpo_loss(stepped[0], stepped[1], rc, rr, beta=0.1)
    assert after.mean() < before.mean()


def test_dpo_sigmoid_is_stable_for_huge_margins() -> None:
    big = torch.tensor([1e5])
    zero = torch.zeros(1)
    losses, _, _ = dpo_loss(-big, big, zero, zero, beta=1.0)
    assert torch.isfinite(losses).all() and losses.item() == pytest.approx(2e5)


def test_dpo_unknown_loss_type_lists_known_names() -> None:
    x = torch.zeros(2)
    with pytest.raises(ValueError) as info:
        dpo_loss(x, x, x, x, beta=0.1, loss_type="kto")
    for name in DPO_LOSSES:
        assert name in str(info.value)
    assert "kto" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"beta": 0.1, "label_smoothing": 0.5}, "label_smoothing"),
        ({"beta": 0.1, "label_smoothing": -0.1}, "label_smoothing"),
    ],
)
def test_dpo_rejects_bad_hyperparameters(kwargs: dict, match: str) -> None:
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=match):
        dpo_loss(x, x, x, x, **kwargs)


def test_dpo_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(3), beta=0.1)
