"""Evaluation of policies on held-out prompts: rewards, KL to the reference, win rates, diversity.

Pure functions over tensors and lists, plus ``evaluate_policy`` which samples a policy's
responses (k per prompt, ``evaluate.samples_per_prompt``) and scores them every way. The
``evaluate`` stage calls it for SFT, PPO and DPO.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from rlhf_core import metrics as M
from rlhf_core.compute_clock import compute_loop
from rlhf_core.generation import generate
from rlhf_core.models.scalar_head import sequence_scores
from rlhf_core.reward_sources import RewardFn
from rlhf_core.rollout import batch_response_logprobs, chunks, sample_batch


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams / all word n-grams over every text; 0 if none."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def sample_set_distinct_n(texts: Sequence[str], n: int, samples_per_prompt: int) -> float:
    """Distinct-n of each set of one response per prompt (sample j of every prompt), averaged over the k sets.

    ``texts`` are prompt-major (rows ``g·k … g·k + k − 1`` answer prompt ``g``). Pooling all P·k texts
    would count a policy's k answers to the same prompt as repetition, so distinct-n would fall as k
    grows; per set it measures what it measures with one sample per prompt (equal to
    :func:`distinct_n` when k = 1).
    """
    k = samples_per_prompt
    return sum(distinct_n(texts[j::k], n) for j in range(k)) / k


def pairwise_wins(scores: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Per prompt: 1 where ``scores`` beats ``baseline``, ½ on a tie, 0 otherwise (their mean is :func:`win_rate`)."""
    return [1.0 if s > b else 0.5 if s == b else 0.0 for s, b in zip(scores, baseline)]


def win_rate(scores: Sequence[float], baseline: Sequence[float]) -> float:
    """Share of prompts where ``scores`` beat ``baseline`` (ties count ½)."""
    if len(scores) != len(baseline) or not scores:
        raise ValueError(f"win_rate needs two equal, non-empty lists; got {len(scores)} and {len(baseline)}")
    return sum(pairwise_wins(scores, baseline)) / len(scores)


def sequence_kl(policy_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte-Carlo KL(π‖π_ref) of sampled responses, k1 estimator Σ_t (log π − log π_ref).

    Shapes: logps (B, T) of the sampled tokens, mask (B, T). Returns (per-sequence KL (B,),
    per-token KL (B,) = per-sequence / response length).
    """
    per_seq = ((policy_logps - ref_logps) * mask).sum(-1)  # (B,)
    return per_seq, per_seq / mask.sum(-1).clamp(min=1)


@dataclass
class PolicyEvaluation:
    """Per-response scores: with k samples per prompt, rows ``g·k … g·k + k − 1`` answer prompt ``g``."""

    responses: list[str]
    rm_scores: list[float]
    gold: list[float] | None
    kl_per_sequence: list[float]
    kl_per_token: list[float]
    lengths: list[int]
    metrics: dict[str, float] = field(default_factory=dict)
    samples_per_prompt: int = 1

    def by_prompt(self, values: Sequence[float]) -> np.ndarray:
        """``values`` (one per response) as shape (P, k): row g holds prompt g's k samples."""
        return np.asarray(values, dtype=np.float64).reshape(-1, self.samples_per_prompt)  # (P·k,) -> (P, k)


@compute_loop
@torch.no_grad()
def evaluate_policy(
    policy, reference, reward_model, tokenizer, prompts: list[str], prompt_ids: list[list[int]], *,
    max_new_tokens: int, temperature: float, batch_size: int, seed: int, gold_fn: RewardFn | None = None,
    samples_per_prompt: int = 1,
) -> PolicyEvaluation:
    """Sample ``samples_per_prompt`` (k) responses per prompt from ``policy`` and score each (RM, gold, KL
    to ``reference``); rows ``g·k … g·k + k − 1`` answer prompt ``g``, and the means are over all P·k."""
    batch = sample_batch(policy, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                         batch_size=batch_size, seed=seed, group_size=samples_per_prompt)
    rm_scores = [score for rows in chunks(len(batch), batch_size)
                 for score in sequence_scores(reward_model, batch.query_response[rows], batch.attention_mask[rows]).float().tolist()]
    pol = batch_response_logprobs(policy, batch, temperature, batch_size)  # (B, R)
    ref = batch_response_logprobs(reference, batch, temperature, batch_size)  # (B, R)
    per_seq, per_tok = sequence_kl(pol, ref, batch.response_mask.to(pol.dtype))
    kl_seq, kl_tok = per_seq.tolist(), per_tok.tolist()
    lengths = batch.response_mask.sum(-1).tolist()
    prompts = [p for p in prompts for _ in range(samples_per_prompt)]  # (P·k,): each response's prompt
    gold = gold_fn(prompts, batch.texts) if gold_fn is not None else None
    metrics = {
        M.RM_SCORE: sum(rm_scores) / len(rm_scores),
        M.KL_PER_SEQUENCE: sum(kl_seq) / len(kl_seq),
        M.KL_PER_TOKEN: sum(kl_tok) / len(kl_tok),
        M.MEAN_RESPONSE_LENGTH: sum(lengths) / len(lengths),
        M.DISTINCT_1: sample_set_distinct_n(batch.texts, 1, samples_per_prompt),
        M.DISTINCT_2: sample_set_distinct_n(batch.texts, 2, samples_per_prompt),
    }
    if gold is not None:
        metrics[M.GOLD_REWARD] = sum(gold) / len(gold)
    return PolicyEvaluation(batch.texts, rm_scores, gold, kl_seq, kl_tok, [int(n) for n in lengths], metrics,
                            samples_per_prompt)


@compute_loop
@torch.no_grad()
def sample_responses(policy, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
                     batch_size: int, seed: int, samples_per_prompt: int = 1) -> list[str]:
    """``samples_per_prompt`` (k) sampled responses per prompt, as text, rows ``g·k … g·k + k − 1`` for prompt
    ``g`` (a policy with its own tokenizer, e.g. the champion in service)."""
    prompt_ids = [ids for ids in prompt_ids for _ in range(samples_per_prompt)]  # (P·k,) prompts, each k times in a row
    return generate(policy, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                    do_sample=True, batch_size=batch_size, seed=seed).texts


@compute_loop
@torch.no_grad()
def score_responses(reward_model, tokenizer, prompt_ids: list[list[int]], responses: list[str], *, batch_size: int) -> list[float]:
    """Reward-model scores of text responses, re-tokenised with the reward model's ``tokenizer``.

    Responses of policies with different tokenizers are judged alike: prompt ids (the reward
    model's encoding) + the response's tokens + EOS, as the reward model was trained.
    """
    from rlhf_core.data.collate import pad
    from rlhf_core.data.tokenize import encode_completions

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sequences = [p + c for p, c in zip(prompt_ids, encode_completions(tokenizer, responses))]
    scores: list[float] = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        ids = pad(batch, pad_id)  # (B, T), right-padded: scores are read at the last real token
        mask = pad([[1] * len(s) for s in batch], 0)  # (B, T)
        scores += sequence_scores(reward_model, ids.to(reward_model.device), mask.to(reward_model.device)).float().tolist()
    return scores
