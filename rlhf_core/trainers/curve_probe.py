"""The over-optimisation curve's point for a ``Trainer``-based policy stage (DPO and its offline kin).

The online trainers (PPO, GRPO) sample held-out responses at every evaluation anyway and record
the point from them. DPO's evaluation scores preference pairs, not samples; :class:`CurveProbe`
adds to it what the curve needs: one response per held-out prompt sampled from the current
policy (the same prompts and seed at every evaluation, the training RNG untouched), scored by the
reward model (proxy), the gold reward where the task has one, and the k1 KL to the reference
(``rlhf_core.evaluation.sequence_kl``). ``DPOTrainer.evaluate`` adds its numbers to the held-out
metrics, so they are logged at each evaluation (``eval/overopt/...``), kept in the ``Trainer``'s
log history (replayed after a resume) and usable as ``best_metric``.
"""

from __future__ import annotations

from typing import Any

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core import metrics as M
from rlhf_core.evaluation import sequence_kl
from rlhf_core.models.scalar_head import sequence_scores
from rlhf_core.overoptimization import curve_metrics
from rlhf_core.reward_sources import RewardFn
from rlhf_core.rollout import PROMPT_TEXT, batch_response_logprobs, chunks, sample_batch, tokenize_prompt_records


def distinct_prompt_records(ds: datasets.Dataset, limit: int) -> datasets.Dataset:
    """The first ``limit`` distinct prompts of ``ds`` (preference data repeats prompts), as prompt records."""
    seen: set[str] = set()
    keep = [i for i, p in enumerate(ds["prompt"]) if not (p in seen or seen.add(p))][:limit]
    return ds.select(keep).select_columns([c for c in ("prompt", "prompt_messages") if c in ds.column_names])


class CurveProbe:
    """Samples and scores the held-out prompts with the current policy: ``probe(policy) -> {"overopt/...": value}``.

    Args:
        reference: frozen reference policy of the KL (the starting policy).
        reward_model: frozen scalar-head reward model (the proxy); it must share ``tokenizer``.
        tokenizer: the policy's tokenizer (pad and eos set).
        prompts: prompt records (``prompt``, ``prompt_messages``), e.g. :func:`distinct_prompt_records` of the eval split.
        max_length / max_new_tokens: prompts are left-truncated to ``max_length − max_new_tokens`` tokens.
        temperature: sampling temperature (also of the log-probs of the KL).
        batch_size: rows per ``generate`` call and forward pass.
        seed: the sampling seed, the same at every evaluation.
        gold_fn: the gold reward ``fn(prompts, responses)``, or ``None``.
    """

    def __init__(self, reference: PreTrainedModel, reward_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 prompts: datasets.Dataset, *, max_length: int, max_new_tokens: int, temperature: float, batch_size: int,
                 seed: int, gold_fn: RewardFn | None = None) -> None:
        tokenized = tokenize_prompt_records(prompts, tokenizer, max_length=max_length, max_new_tokens=max_new_tokens,
                                            what="over-optimisation prompts")
        if len(tokenized) == 0:
            raise ValueError("over-optimisation prompts: no prompt left after tokenisation")
        self.prompt_ids = [list(p) for p in tokenized["prompt_input_ids"]]
        self.prompts = list(tokenized[PROMPT_TEXT])
        self.reference, self.reward_model, self.tokenizer = reference, reward_model, tokenizer
        for frozen in (reference, reward_model):
            frozen.eval().requires_grad_(False)
        self.max_new_tokens, self.temperature, self.batch_size, self.seed = max_new_tokens, temperature, batch_size, seed
        self.gold_fn = gold_fn

    @torch.no_grad()
    def __call__(self, policy: Any) -> dict[str, float]:
        """The curve's point of ``policy`` as it is now: ``overopt/proxy_reward``, ``gold_reward``, ``kl``, ``sqrt_kl``."""
        device = next(policy.parameters()).device
        for frozen in (self.reference, self.reward_model):
            frozen.to(device)
        was_training = policy.training
        policy.eval()
        try:
            batch = sample_batch(policy, self.tokenizer, self.prompt_ids, max_new_tokens=self.max_new_tokens,
                                 temperature=self.temperature, batch_size=self.batch_size, seed=self.seed)
            proxy = torch.cat([sequence_scores(self.reward_model, batch.query_response[rows], batch.attention_mask[rows]).float()
                               for rows in chunks(len(batch), self.batch_size)])  # (B,)
            logps = batch_response_logprobs(policy, batch, self.temperature, self.batch_size).float()  # (B, R)
            ref = batch_response_logprobs(self.reference, batch, self.temperature, self.batch_size).float()  # (B, R)
            kl, _ = sequence_kl(logps, ref, batch.response_mask.to(logps.dtype))  # (B,) k1 per sequence
        finally:
            policy.train(was_training)
        gold = self.gold_fn(self.prompts, batch.texts) if self.gold_fn is not None else None
        point = curve_metrics(proxy.tolist(), kl.tolist(), gold)
        return {name[len(M.EVAL) + 1:]: value for name, value in point.items()}  # the Trainer adds its eval_ prefix
