"""The offline preference objectives the ``dpo`` trainer can optimise: DPO, SimPO, ORPO and KTO.

All four read the same batches (``PreferenceCollator``: chosen and rejected sequences of each
pair) and the same completion log-probs (``rlhf_core.logprobs.sequence_logprobs``, one forward
pass for both sides); they differ in the loss (``rlhf_core.losses``) and in whether a frozen
reference is needed:

- ``dpo`` (Rafailov et al. 2023): reference; ``loss_type`` picks sigmoid/IPO/hinge/robust.
- ``simpo`` (Meng et al. 2024): reference-free margin on length-averaged log-probs.
- ``orpo`` (Hong et al. 2024): reference-free; NLL of the chosen tokens + the odds-ratio term.
- ``kto`` (Ethayarajh et al. 2024): each pair is split into a desirable (chosen) and an
  undesirable (rejected) example; the reference point is KL(π_θ‖π_ref) estimated on mismatched
  prompt/completion pairs (example ``i``'s prompt with example ``i−1``'s chosen completion, fixed
  at tokenisation as TRL's KL dataset is), so its reference log-probs can be precomputed too.

Each ``*_terms`` function returns ``(losses (N,), stats)``; ``stats`` uses the metric names of
``rlhf_core.metrics``, with the method's implicit reward under ``rewards/…`` (as TRL logs them), so
``rewards/accuracies`` is every method's held-out preference accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import torch
from torch import Tensor

from rlhf_core import metrics as M
from rlhf_core.losses import dpo_loss, kto_loss, orpo_loss, simpo_loss
from rlhf_core.trainers.train_config import METHODS as METHODS  # the names, torch-free, for the configs

NEEDS_REFERENCE = {"dpo", "kto"}


@dataclass
class PairLogps:
    """Summed completion log-probs of a batch of pairs and their completion token counts, each ``(B,)``."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor

    @property
    def chosen_mean(self) -> Tensor:
        return self.chosen / self.chosen_tokens

    @property
    def rejected_mean(self) -> Tensor:
        return self.rejected / self.rejected_tokens


def pair_stats(chosen_rewards: Tensor, rejected_rewards: Tensor, logps: PairLogps) -> dict[str, Tensor]:
    """The logged batch metrics, from the implicit rewards of each side (``(B,)`` each)."""
    return {
        M.REWARDS_CHOSEN: chosen_rewards.detach(),
        M.REWARDS_REJECTED: rejected_rewards.detach(),
        M.REWARDS_ACCURACIES: (chosen_rewards > rejected_rewards).float(),
        M.REWARDS_MARGINS: (chosen_rewards - rejected_rewards).detach(),
        M.LOGPS_CHOSEN: logps.chosen.detach(),
        M.LOGPS_REJECTED: logps.rejected.detach(),
    }


def chosen_nll(logps: PairLogps) -> Tensor:
    """Mean NLL per chosen completion token over the whole batch (a scalar, as TRL's ``policy_nll_loss``)."""
    return -logps.chosen.sum() / logps.chosen_tokens.sum()


def simpo_terms(logps: PairLogps, *, beta: float, gamma: float, label_smoothing: float) -> tuple[Tensor, dict[str, Tensor]]:
    """SimPO losses ``(B,)``; implicit reward ``β·(1/|y|)·log π_θ(y|x)``."""
    losses = simpo_loss(logps.chosen_mean, logps.rejected_mean, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    return losses, pair_stats(beta * logps.chosen_mean, beta * logps.rejected_mean, logps)


def orpo_terms(logps: PairLogps, *, beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """ORPO: per-pair odds-ratio losses ``(B,)`` plus the batch's chosen NLL (spread over the pairs).

    The mean of the returned losses is TRL's ``policy_nll_loss − β·mean(log σ(log OR))``.
    """
    losses, log_odds = orpo_loss(logps.chosen_mean, logps.rejected_mean, beta=beta)
    nll = chosen_nll(logps)
    stats = pair_stats(beta * logps.chosen_mean, beta * logps.rejected_mean, logps)
    stats["log_odds_ratio"] = log_odds
    stats["nll_loss"] = nll.detach()
    return losses + nll, stats


def dpo_terms(logps: PairLogps, ref: tuple[Tensor, Tensor], *, beta: float, loss_type: str, label_smoothing: float,
              average: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO losses ``(B,)`` on summed (or, for IPO, averaged) log-probs against the reference's."""
    chosen, rejected = (logps.chosen_mean, logps.rejected_mean) if average else (logps.chosen, logps.rejected)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen, rejected, ref[0].to(chosen.dtype), ref[1].to(chosen.dtype),
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
    )
    return losses, pair_stats(chosen_rewards, rejected_rewards, logps)


def kto_terms(logps: PairLogps, ref: tuple[Tensor, Tensor], kl: Tensor, *, beta: float, desirable_weight: float,
              undesirable_weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO losses ``(2B,)``: the chosen completions as desirable, the rejected as undesirable."""
    policy = torch.cat([logps.chosen, logps.rejected])  # (2B,)
    reference = torch.cat([ref[0], ref[1]]).to(policy.dtype)  # (2B,)
    desirable = torch.cat([torch.ones_like(logps.chosen, dtype=torch.bool), torch.zeros_like(logps.rejected, dtype=torch.bool)])
    losses, rewards = kto_loss(policy, reference, desirable, kl, beta=beta,
                               desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    chosen_rewards, rejected_rewards = rewards.chunk(2)
    stats = pair_stats(chosen_rewards, rejected_rewards, logps)
    stats[M.KL] = kl.detach().reshape(())
    return losses, stats


def with_mismatched_completions(tokenized: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Adds ``kl_input_ids`` (completion ids, as ``chosen_input_ids``): example ``i−1``'s chosen completion
    for example ``i``'s prompt (cyclic), cut so prompt + completion fit ``max_length``.

    These mismatched pairs estimate KTO's reference point KL(π_θ‖π_ref) (Ethayarajh et al. 2024
    §4.2; TRL shifts completions by one the same way). Fixed per dataset, so reference log-probs
    on them can be precomputed like the others.
    """
    prompts = list(tokenized["prompt_input_ids"])
    chosen = list(tokenized["chosen_input_ids"])
    shifted = chosen[-1:] + chosen[:-1]
    return tokenized.add_column("kl_input_ids", [c[: max(max_length - len(p), 0)] for p, c in zip(prompts, shifted)])
