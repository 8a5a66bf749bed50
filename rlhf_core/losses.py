"""Training losses as pure functions on tensors: SFT, reward model (Bradley–Terry) and the DPO family.

No model calls here: log-probs come from :mod:`rlhf_core.logprobs`, rewards from the reward model's head.
Each function states its tensor shapes and the equation it implements.

DPO variants live in the registry :data:`DPO_LOSSES` (name → pure function of ``(Δ, β, ε)``), so a trainer
selects one by name instead of branching on strings; a new variant is one function plus one registry entry.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_core.logprobs import selective_log_softmax

__all__ = ["DPO_LOSSES", "DPOLossFn", "dpo_loss", "reward_loss", "sft_loss"]

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


def _dpo_ipo(logits: Tensor, beta: float, label_smoothing: float) -> Tensor:  # noqa: ARG001 - registry signature
    """IPO (Azar et al. 2023, Eq. 17, τ = β): ``(Δ − 1/(2β))²``. Feed length-averaged log-probs, as the
    authors' results do (``sequence_logprobs(..., average=True)``)."""
    return (logits - 1 / (2 * beta)) ** 2


def _dpo_hinge(logits: Tensor, beta: float, label_smoothing: float) -> Tensor:  # noqa: ARG001 - registry signature
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
