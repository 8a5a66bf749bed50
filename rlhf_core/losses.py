"""Training losses as pure functions on tensors: SFT, reward model (Bradley–Terry), the DPO family, KTO (unpaired
desirable/undesirable labels) and the reference-free ORPO and SimPO.

No model calls here: log-probs come from :mod:`rlhf_core.logprobs`, rewards from the reward model's head.
Each function states its tensor shapes and the equation it implements.

DPO variants live in the registry :data:`DPO_LOSSES` (name → pure function of ``(Δ, β, ε)``), so a trainer
selects one by name instead of branching on strings; a new variant is one function plus one registry entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_core.logprobs import selective_log_softmax

__all__ = ["DPO_LOSSES", "DPOLossFn", "dpo_loss", "kto_loss", "orpo_loss", "reward_loss", "sft_loss", "simpo_loss"]

DPOLossFn = Callable[[Tensor, float, float], Tensor]
"""``(logits=Δ (B,), beta=β, label_smoothing=ε) -> per-pair losses (B,)``."""


# --------------------------------------------------------------------------------------------------- SFT


def sft_loss(logits: Tensor, labels: Tensor, loss_mask: Tensor) -> Tensor:
    """Token-level negative log-likelihood, averaged over every unmasked token of the batch.

    ``L = −(1/N) Σ_{b,t : m_bt} log softmax(z_bt)[y_bt]`` with ``N = Σ m_bt`` (tokens, not sequences, are
    weighted equally, as in ``cross_entropy(..., ignore_index=-100)``).

    Args:
        logits: ``(B, T, V)`` already aligned with ``labels`` (the caller shifts: ``logits[:, :-1]`` with
            ``input_ids[:, 1:]``).
        labels: ``(B, T)`` target ids; any value (e.g. ``-100``) is allowed where ``loss_mask`` is false.
        loss_mask: ``(B, T)`` bool or 0/1: which positions carry loss (completion tokens).

    Returns:
        Scalar mean NLL. ``0.0`` (still attached to the graph) when no position is unmasked, instead of NaN.
    """
    if logits.ndim != 3 or logits.shape[:2] != labels.shape or labels.shape != loss_mask.shape:
        raise ValueError(
            "sft_loss: expected logits (B, T, V) with labels and loss_mask (B, T); got logits "
            f"{tuple(logits.shape)}, labels {tuple(labels.shape)}, loss_mask {tuple(loss_mask.shape)}"
        )
    mask = loss_mask.bool()  # (B, T)
    vocab_size = logits.shape[-1]
    used = labels[mask]  # (N,)
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= vocab_size):
        raise ValueError(
            f"sft_loss: labels under loss_mask must lie in [0, {vocab_size}); got range "
            f"[{int(used.min())}, {int(used.max())}] (is a -100 label left inside the loss mask?)"
        )
    safe_labels = labels.masked_fill(~mask, 0)  # (B, T): gather cannot index with -100
    token_logps = selective_log_softmax(logits, safe_labels)  # (B, T)
    nll = -torch.where(mask, token_logps, torch.zeros_like(token_logps)).sum()
    return nll / mask.sum().clamp(min=1)


# ------------------------------------------------------------------------------------------ reward model


def reward_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | float | None = None) -> Tensor:
    """Bradley–Terry pairwise loss for a reward model, per pair.

    ``L = −log σ(r_θ(x, y_c) − r_θ(x, y_r) − m)`` (Ouyang et al. 2022, Eq. 1; the margin ``m`` is Llama 2's,
    Touvron et al. 2023, Eq. 2). ``logsigmoid`` keeps it finite for large reward gaps.

    Args:
        chosen_rewards: ``(B,)`` scalar rewards of the preferred responses.
        rejected_rewards: ``(B,)`` rewards of the dispreferred responses.
        margin: ``(B,)`` or a scalar, how much larger the chosen reward must be; ``None`` means 0.

    Returns:
        ``(B,)`` per-pair losses (take ``.mean()`` for the batch loss).
    """
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.ndim != 1:
        raise ValueError(
            "reward_loss: chosen_rewards and rejected_rewards must both be (B,); got "
            f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}"
        )
    diff = chosen_rewards - rejected_rewards  # (B,)
    if margin is not None:
        if isinstance(margin, Tensor) and margin.ndim > 0 and margin.shape != diff.shape:
            raise ValueError(f"reward_loss: margin must be a scalar or {tuple(diff.shape)}, got {tuple(margin.shape)}")
        diff = diff - margin
    return -F.logsigmoid(diff)


# ------------------------------------------------------------------------------------------------ DPO


def _dpo_sigmoid(logits: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7): ``−log σ(βΔ)``; with ``ε > 0`` conservative DPO (cDPO):
    ``−(1−ε) log σ(βΔ) − ε log σ(−βΔ)``, i.e. the label is flipped with probability ``ε``."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)


def _dpo_ipo(logits: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17, τ = β): ``(Δ − 1/(2β))²``. Feed length-averaged log-probs, as the
    authors' results do (``sequence_logprobs(..., average=True)``)."""
    return (logits - 1 / (2 * beta)) ** 2


def _dpo_hinge(logits: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """SLiC hinge (Zhao et al. 2023, Eq. 2 with δ = 1/β, scaled by β): ``max(0, 1 − βΔ)``."""
    return torch.relu(1 - beta * logits)


def _dpo_robust(logits: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """Robust DPO (rDPO, Chowdhury et al. 2024): unbiased under label-flip rate ``ε``,
    ``(−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε)``."""
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(beta * logits) + eps * F.logsigmoid(-beta * logits)) / (1 - 2 * eps)


DPO_LOSSES: dict[str, DPOLossFn] = {
    "sigmoid": _dpo_sigmoid,
    "ipo": _dpo_ipo,
    "hinge": _dpo_hinge,
    "robust": _dpo_robust,
}
"""DPO-family losses by name. Each maps ``(Δ (B,), β, ε)`` to per-pair losses ``(B,)``; ``ε`` is used by
``sigmoid`` (cDPO) and ``robust`` only."""


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct Preference Optimisation loss and its implicit rewards (Rafailov et al. 2023).

    With the log-ratio margin
    ``Δ = (log π_θ(y_c|x) − log π_ref(y_c|x)) − (log π_θ(y_r|x) − log π_ref(y_r|x))``
    the per-pair loss is ``DPO_LOSSES[loss_type](Δ, β, ε)``; the implicit reward of a response is
    ``r̂(x, y) = β (log π_θ(y|x) − log π_ref(y|x))`` (Eq. 5), returned detached for logging.

    Args:
        policy_chosen_logps: ``(B,)`` ``log π_θ(y_c|x)`` (summed, or averaged for IPO, over completion tokens).
        policy_rejected_logps: ``(B,)`` ``log π_θ(y_r|x)``.
        ref_chosen_logps: ``(B,)`` ``log π_ref(y_c|x)``.
        ref_rejected_logps: ``(B,)`` ``log π_ref(y_r|x)``.
        beta: ``β > 0``, strength of the KL constraint to the reference (``τ`` in IPO).
        loss_type: a key of :data:`DPO_LOSSES`.
        label_smoothing: ``ε ∈ [0, 0.5)``, assumed preference-label noise (``sigmoid`` and ``robust`` only).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``; rewards are detached.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; known: {sorted(DPO_LOSSES)}")
    if not beta > 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must satisfy 0 <= label_smoothing < 0.5, got {label_smoothing}")
    shapes = {
        "policy_chosen_logps": tuple(policy_chosen_logps.shape),
        "policy_rejected_logps": tuple(policy_rejected_logps.shape),
        "ref_chosen_logps": tuple(ref_chosen_logps.shape),
        "ref_rejected_logps": tuple(ref_rejected_logps.shape),
    }
    if len(set(shapes.values())) != 1 or policy_chosen_logps.ndim != 1:
        raise ValueError(f"dpo_loss: all four log-prob tensors must be (B,); got {shapes}")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    logits = chosen_logratios - rejected_logratios  # (B,) Δ
    losses = DPO_LOSSES[loss_type](logits, beta, label_smoothing)  # (B,)
    chosen_rewards = beta * chosen_logratios.detach()  # (B,)
    rejected_rewards = beta * rejected_logratios.detach()  # (B,)
    return losses, chosen_rewards, rejected_rewards


# ------------------------------------------------------------------------------------- KTO, ORPO, SimPO


def _check_pair(fn: str, **tensors: Tensor) -> None:
    """Raise unless every tensor is ``(B,)`` with the same ``B``."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or next(iter(tensors.values())).ndim != 1:
        raise ValueError(f"{fn}: all inputs must be (B,) with the same B; got {shapes}")


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor | float,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Kahneman–Tversky Optimisation on unpaired, labelled completions (Ethayarajh et al. 2024, §4).

    With the implied reward ``r = log π_θ(y|x) − log π_ref(y|x)`` and the reference point ``z₀ = KL`` (an
    estimate of KL(π_θ ‖ π_ref) over mismatched prompt/completion pairs, clamped at 0 and not differentiated):
    desirable ``y``: ``w_d·(1 − σ(β(r − z₀)))``; undesirable ``y``: ``w_u·(1 − σ(β(z₀ − r)))``.

    Args:
        policy_logps: ``(B,)`` summed completion log-probs ``log π_θ(y|x)``.
        ref_logps: ``(B,)`` the same under the reference.
        desirable: ``(B,)`` bool (or 0/1): True where ``y`` is a desirable completion.
        kl: scalar ``z₀`` the caller estimates (TRL: batch mean of ``log π_θ − log π_ref`` on shifted pairs).
        beta: ``β > 0``.
        desirable_weight: ``w_d ≥ 0`` (the paper balances ``w_d·n_d`` against ``w_u·n_u``).
        undesirable_weight: ``w_u ≥ 0``.

    Returns:
        ``(losses, rewards)``, each ``(B,)`` in input order; ``rewards = β·r`` detached, for logging.
    """
    _check_pair("kto_loss", policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)
    if desirable.is_floating_point():
        raise ValueError(f"kto_loss: desirable must be bool or 0/1 integers, got dtype {desirable.dtype}")
    if not beta > 0:
        raise ValueError(f"kto_loss: beta must be > 0, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(f"kto_loss: weights must be >= 0, got {desirable_weight}, {undesirable_weight}")
    z0 = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    if z0.numel() != 1:
        raise ValueError(f"kto_loss: kl must be a scalar, got shape {tuple(z0.shape)}")
    z0 = z0.reshape(()).clamp(min=0)  # the reference point; a negative estimate is sampling noise
    logratios = policy_logps - ref_logps  # (B,) r
    good = desirable.bool()  # (B,)
    # 1 − σ(x) written as σ(−x): exact in the tail where 1 − σ(x) rounds to 0.
    losses = torch.where(
        good,
        desirable_weight * torch.sigmoid(-beta * (logratios - z0)),
        undesirable_weight * torch.sigmoid(-beta * (z0 - logratios)),
    )  # (B,)
    return losses, beta * logratios.detach()


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 − eˣ)`` for ``x ≤ 0`` without cancellation (Mächler 2012): ``log(−expm1(x))`` near 0,
    ``log1p(−eˣ)`` below ``−ln 2``."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, *, beta: float) -> tuple[Tensor, Tensor]:
    """ORPO's odds-ratio term (Hong et al. 2024, Eq. 6–7), on length-averaged log-probs.

    ``odds(y|x) = P/(1 − P)`` with ``log P = c`` (chosen) or ``r`` (rejected), so
    ``log OR = (c − r) − (log(1 − eᶜ) − log(1 − eʳ))`` and the per-pair loss is ``−β·log σ(log OR)``
    (β is the paper's λ). The trainer adds the chosen responses' NLL: ``L = L_SFT + mean(losses)``.

    Args:
        chosen_logps: ``(B,)`` mean per-token ``log π_θ`` of the chosen completions (``< 0``).
        rejected_logps: ``(B,)`` the same for the rejected ones.
        beta: ``β > 0``, weight of the odds-ratio term.

    Returns:
        ``(losses, log_odds)``, each ``(B,)``; ``log_odds`` detached, for logging.
    """
    _check_pair("orpo_loss", chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    if not beta > 0:
        raise ValueError(f"orpo_loss: beta must be > 0, got {beta}")
    if bool((chosen_logps > 0).any() or (rejected_logps > 0).any()):
        raise ValueError("orpo_loss: log-probs must be <= 0 (pass length-averaged log π, not logits)")
    log_odds = (chosen_logps - rejected_logps) - (_log1mexp(chosen_logps) - _log1mexp(rejected_logps))  # (B,)
    return -beta * F.logsigmoid(log_odds), log_odds.detach()


def simpo_loss(
    chosen_logps: Tensor, rejected_logps: Tensor, *, beta: float, gamma: float, label_smoothing: float = 0.0
) -> Tensor:
    """SimPO (Meng et al. 2024, Eq. 6): a reference-free margin loss on length-averaged log-probs.

    ``z = (c − r) − γ/β``, ``L = −(1−ε)·log σ(βz) − ε·log σ(−βz)``: the implicit reward is
    ``β·(1/|y|)·log π_θ(y|x)`` and the chosen must win by at least ``γ``; ``ε`` is cDPO-style label smoothing.

    Args:
        chosen_logps: ``(B,)`` mean per-token ``log π_θ`` of the chosen completions.
        rejected_logps: ``(B,)`` the same for the rejected ones.
        beta: ``β > 0`` (the paper uses 2–10).
        gamma: target reward margin ``γ ≥ 0``.
        label_smoothing: ``ε ∈ [0, 0.5)``.

    Returns:
        ``(B,)`` per-pair losses.
    """
    _check_pair("simpo_loss", chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    if not beta > 0:
        raise ValueError(f"simpo_loss: beta must be > 0, got {beta}")
    if gamma < 0:
        raise ValueError(f"simpo_loss: gamma must be >= 0, got {gamma}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"simpo_loss: label_smoothing must satisfy 0 <= label_smoothing < 0.5, got {label_smoothing}")
    z = (chosen_logps - rejected_logps) - gamma / beta  # (B,)
    return -(1 - label_smoothing) * F.logsigmoid(beta * z) - label_smoothing * F.logsigmoid(-beta * z)
