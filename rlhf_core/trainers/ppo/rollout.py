"""PPO's rollouts: sample a response per prompt, then score it with every model, without gradients.

Sampling, slicing and log-prob recomputation are ``rlhf_core.rollout``'s (shared with evaluation
and the group methods); this module adds what PPO needs on top: the value and entropy of each
response token, the reference log-probs, and the score (details 1, 3 and 4 of
``rlhf_core.trainers.ppo``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.logprobs import entropy_from_logits
from rlhf_core.models.scalar_head import sequence_scores
from rlhf_core.reward_sources import CombinedReward
from rlhf_core.rollout import SampledBatch, chunks, model_response_logprobs, response_columns, response_logprobs, sample_rows
from rlhf_core.trainers.ppo.config import PPOConfig
from rlhf_core.trainers.ppo.models import PolicyAndValue


@dataclass
class Rollout(SampledBatch):
    """One batch of B sampled responses and everything PPO needs about them. R = response width."""

    prompts: list[str]
    logprobs: Tensor
    """(B, R) log π_old(y_t) at temperature τ, 0 on padding."""
    ref_logprobs: Tensor
    """(B, R) log π_ref(y_t) at temperature τ."""
    values: Tensor
    """(B, R) V(s_t): value of the prefix before response token t."""
    entropy: Tensor
    """(B,) Σ_t H(π_old(·|s_t)) over response tokens."""
    raw_scores: Tensor
    """(B,) combined reward before normalisation and penalty."""
    scores: Tensor
    """(B,) normalised, penalised score: the reward at the last response token."""
    proxy_scores: Tensor
    """(B,) the reward model's own score (the proxy of the over-optimisation curves); ``raw_scores`` without a reward model."""


@dataclass
class RewardNorm:
    """Gain and bias of detail 1: ``s' = gain·s + bias``."""

    gain: float = 1.0
    bias: float = 0.0
    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def fit(cls, raw: list[float]) -> RewardNorm:
        """Mean 0, std 1 on ``raw``; a (near-)constant ``raw`` keeps gain 1 and only centres."""
        values = torch.tensor(raw, dtype=torch.float64)
        mean, std = float(values.mean()), float(values.std(unbiased=False))
        gain = 1.0 / std if std > 1e-6 else 1.0
        return cls(gain=gain, bias=-mean * gain, mean=mean, std=std)

    def __call__(self, raw: Tensor) -> Tensor:
        return raw * self.gain + self.bias


class RolloutCollector:
    """Samples from the policy and scores the responses with the policy, value, reference and reward models."""

    def __init__(self, cfg: PPOConfig, ref_policy: PreTrainedModel, reward_model: PreTrainedModel | None,
                 reward: CombinedReward, tokenizer: PreTrainedTokenizerBase) -> None:
        self.cfg, self.ref_policy, self.reward_model, self.reward, self.tokenizer = cfg, ref_policy, reward_model, reward, tokenizer

    @torch.no_grad()
    def score(self, batch: SampledBatch, prompts: list[str], norm: RewardNorm) -> tuple[Tensor, Tensor, Tensor]:
        """(B,) raw combined reward, (B,) normalised + penalised score (details 1 and 3) and (B,) proxy score (the
        reward model's, even at weight 0; the raw combined reward without a reward model)."""
        cfg = self.cfg
        rm_scores = None
        if self.reward_model is not None:
            rm_scores = torch.cat([
                sequence_scores(self.reward_model, batch.query_response[rows], batch.attention_mask[rows]).float()
                for rows in chunks(len(batch), cfg.forward_batch_size)
            ]).tolist()
        device = batch.query_response.device
        raw = torch.tensor(self.reward(prompts, batch.texts, rm_scores), dtype=torch.float32, device=device)  # (B,)
        proxy = torch.tensor(rm_scores, dtype=torch.float32, device=device) if rm_scores is not None else raw.clone()  # (B,)
        scores = norm(raw) if cfg.normalize_reward else raw.clone()
        penalty = cfg.missing_eos_penalty
        if penalty is not None:
            penalised = scores - penalty if cfg.missing_eos_mode == "subtract" else torch.full_like(scores, -penalty)
            scores = torch.where(batch.has_eos, scores, penalised)
        return raw, scores, proxy

    @torch.no_grad()
    def collect(self, model: PolicyAndValue, prompt_ids: list[list[int]], prompts: list[str], norm: RewardNorm, *,
                seed: int | None = None, do_sample: bool = True, seed_of_row: Callable[[int], int] | None = None,
                ) -> tuple[Rollout, dict[str, float]]:
        """Sample one response per prompt and score it; also returns the wall time of the phases.

        ``model`` is the unwrapped policy and value, in eval mode. ``seed=None`` samples from the
        global RNG; a seed leaves it untouched (evaluation); ``seed_of_row`` seeds each ``generate`` call
        by its first row (training rollouts: ``rlhf_core.rollout.sample_rows``).
        """
        cfg, tau = self.cfg, self.cfg.temperature
        started = time.perf_counter()
        batch = sample_rows(model.policy, self.tokenizer, prompt_ids, max_new_tokens=cfg.max_new_tokens, temperature=tau,
                            do_sample=do_sample, batch_size=cfg.forward_batch_size, seed=seed, seed_of_row=seed_of_row)
        generated = time.perf_counter()
        n_query, mask, completion_mask = batch.n_query, batch.mask, batch.completion_mask  # (B, R), (B, Q+R)
        parts: dict[str, list[Tensor]] = {"logprobs": [], "ref_logprobs": [], "values": [], "entropy": []}
        for rows in chunks(len(batch), cfg.forward_batch_size):
            ids, attn = batch.query_response[rows], batch.attention_mask[rows]
            logits, values = model(ids, attn)  # (b, Q+R, V), (b, Q+R)
            parts["logprobs"].append(response_logprobs(logits, ids, completion_mask[rows], n_query, tau))  # (b, R)
            parts["values"].append(response_columns(values, n_query).float())  # (b, R): V of the prefix before token t
            entropy = entropy_from_logits(response_columns(logits, n_query) / tau)  # (b, R)
            parts["entropy"].append(torch.where(mask[rows], entropy, 0.0).sum(dim=1))  # (b,)
            parts["ref_logprobs"].append(model_response_logprobs(self.ref_policy, ids, attn, n_query, tau))  # (b, R)
        raw, scores, proxy = self.score(batch, prompts, norm)
        # Wall time of the phases of a PPO step (bench/ppo_step.py reads them from the logs).
        timing = {"generation": generated - started, "scoring": time.perf_counter() - generated,
                  "generated_tokens": float(batch.response_mask.sum())}
        cat = {name: torch.cat(chunk) for name, chunk in parts.items()}
        rollout = Rollout(**{f.name: getattr(batch, f.name) for f in fields(SampledBatch)}, prompts=prompts,
                          logprobs=cat["logprobs"].float(), ref_logprobs=cat["ref_logprobs"].float(), values=cat["values"],
                          entropy=cat["entropy"].float(), raw_scores=raw, scores=scores, proxy_scores=proxy)
        return rollout, timing
