"""Rollouts: sample responses to prompts, then score their tokens again with a forward pass.

Shared by PPO (``rlhf_core.trainers.ppo``), policy evaluation (``rlhf_core.evaluation``) and the
critic-free group methods (GRPO/RLOO sample ``k`` responses per prompt: ``group_size``, in the row
layout of ``rlhf_core.rl.group``).

Layout of a sampled batch (from ``generation.generate``): prompts are left-padded to one width Q,
responses right-padded to one width R, and ``query_response`` (B, Q + R) is the prompt ids followed
by the response ids. Response token ``j`` sits at column ``Q + j`` and is predicted by the logits
at column ``Q + j − 1``; so the logits, log-probs and per-token values (V of the prefix before
token ``j``) of the response are columns ``Q − 1 … Q + R − 2`` of a forward pass over the batch
(:func:`response_columns`).

Log-probs are recomputed, not taken from ``generate``'s scores: ``log softmax(z/τ)`` at the
sampling temperature τ, for the sampling policy, the policy being trained and the reference
alike (PPO detail 4), with position ids from the attention mask so left padding changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.data.tokenize import TruncationConfig, tokenize_prompts
from rlhf_core.generation import generate
from rlhf_core.logprobs import causal_lm_logits, masked_token_logprobs


@dataclass
class SampledBatch:
    """B sampled responses and their prompts as one batch of token ids. Q = prompt width, R = response width."""

    query_response: Tensor
    """(B, Q + R) prompt ids (left-padded) followed by response ids (right-padded)."""
    attention_mask: Tensor
    """(B, Q + R) 1 on real prompt and response tokens."""
    n_query: int
    """Q: responses start at this column."""
    response_mask: Tensor
    """(B, R) long, 1 on response tokens up to and including the first EOS."""
    has_eos: Tensor
    """(B,) bool, True where the response ended with EOS (False: cut at ``max_new_tokens``)."""
    texts: list[str]
    """Decoded responses, special tokens skipped."""

    @property
    def mask(self) -> Tensor:
        """(B, R) bool response mask."""
        return self.response_mask.bool()

    @property
    def completion_mask(self) -> Tensor:
        """(B, Q + R) 1 on response tokens, in ``query_response`` coordinates."""
        return torch.cat([torch.zeros_like(self.query_response[:, : self.n_query]), self.response_mask.long()], dim=1)

    def __len__(self) -> int:
        return self.query_response.shape[0]


def sample_batch(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    do_sample: bool = True,
    seed: int | None = None,
    group_size: int = 1,
) -> SampledBatch:
    """Sample ``group_size`` responses per prompt at ``temperature`` (top-k 0, top-p 1: plain ancestral sampling).

    Args:
        policy: the causal LM to sample from (put it in eval mode).
        tokenizer: pad and eos tokens, decoding.
        prompt_ids: N token-id lists.
        max_new_tokens: response budget; a response ends at its first EOS (kept).
        temperature: τ; the log-probs of the tokens must then be scored at the same τ.
        batch_size: prompts per ``generate`` call.
        do_sample: ``False``: greedy decoding.
        seed: draw from a fresh RNG seeded with this (the caller's RNG untouched); ``None``: the global RNG.
        group_size: k responses per prompt, in consecutive rows (rows ``g·k … g·k + k − 1`` answer
            prompt ``g``), the layout ``rlhf_core.rl.group`` expects. 1: one response per prompt.

    Returns:
        A :class:`SampledBatch` of ``N · group_size`` rows.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"sample_batch: group_size must be an int >= 1, got {group_size!r}")
    if group_size > 1:
        prompt_ids = [ids for ids in prompt_ids for _ in range(group_size)]
    out = generate(policy, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, top_p=1.0,
                   do_sample=do_sample, batch_size=batch_size, seed=seed)
    return SampledBatch(
        query_response=torch.cat([out.query_ids, out.response_ids], dim=1),  # (B, Q+R)
        attention_mask=torch.cat([out.query_mask, out.response_mask], dim=1),  # (B, Q+R)
        n_query=out.query_ids.shape[1],
        response_mask=out.response_mask,
        has_eos=out.has_eos,
        texts=out.texts,
    )


def merge_sampled(parts: list[SampledBatch], pad_id: int) -> SampledBatch:
    """One batch of several sampled batches: prompts left-padded, responses right-padded to the widest."""
    from torch.nn.functional import pad

    width_q = max(p.n_query for p in parts)
    width_r = max(p.response_mask.shape[1] for p in parts)

    def widen(t: Any, q: int, value: int) -> Any:  # (b, q + r) -> (b, Q + R)
        query, response = pad(t[:, :q], (width_q - q, 0), value=value), t[:, q:]
        return torch.cat([query, pad(response, (0, width_r - response.shape[1]), value=value)], dim=1)

    return SampledBatch(
        query_response=torch.cat([widen(p.query_response, p.n_query, pad_id) for p in parts]),  # (B, Q+R)
        attention_mask=torch.cat([widen(p.attention_mask, p.n_query, 0) for p in parts]),  # (B, Q+R)
        n_query=width_q,
        response_mask=torch.cat([pad(p.response_mask, (0, width_r - p.response_mask.shape[1])) for p in parts]),  # (B, R)
        has_eos=torch.cat([p.has_eos for p in parts]),  # (B,)
        texts=[t for p in parts for t in p.texts],
    )


def sample_rows(policy: Any, tokenizer: Any, prompt_ids: list[list[int]], *, batch_size: int, seed: int | None = None,
                seed_of_row: Callable[[int], int] | None = None, **generation: Any) -> SampledBatch:
    """``sample_batch`` of one response per prompt, ``batch_size`` rows per ``generate`` call.

    With ``seed_of_row``, the call whose first row is ``i`` draws from ``seed_of_row(i)``: a row's
    sample depends only on the rows of its call, so a batch split over processes in multiples of
    ``batch_size`` samples what one process given the whole batch does. Else ``seed`` (``None``: the
    global RNG) seeds all the calls in turn.
    """
    if seed_of_row is None:
        return sample_batch(policy, tokenizer, prompt_ids, batch_size=batch_size, seed=seed, **generation)
    parts = [sample_batch(policy, tokenizer, prompt_ids[i : i + batch_size], batch_size=batch_size, seed=seed_of_row(i),
                          **generation) for i in range(0, len(prompt_ids), batch_size)]
    return merge_sampled(parts, tokenizer.pad_token_id)


def chunks(n: int, size: int) -> Iterator[slice]:
    """Row slices ``[0, size), [size, 2·size), …`` covering ``n`` rows: batches of forward passes."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def response_columns(per_position: Tensor, n_query: int) -> Tensor:
    """(B, Q + R, ...) outputs of a forward pass -> (B, R, ...): those at the positions that predict the response.

    For logits these are the distributions of the response tokens; for a value head, V(s_t) of the
    prefix before response token ``t``.
    """
    return per_position[:, n_query - 1 : -1]


def response_logprobs(logits: Tensor, query_response: Tensor, completion_mask: Tensor, n_query: int,
                      temperature: float) -> Tensor:
    """(B, R) ``log softmax(z/τ)`` of the sampled response tokens from the logits (B, Q + R, V); 0 outside the mask.

    Differentiable: the policy-gradient losses call it on the logits of the model being trained.
    """
    per_token = masked_token_logprobs(logits, query_response, completion_mask, temperature)  # (B, Q+R-1)
    return per_token[:, n_query - 1 :]  # column j scores token j+1: response tokens start at Q


def model_response_logprobs(model: nn.Module, query_response: Tensor, attention_mask: Tensor, n_query: int,
                            temperature: float) -> Tensor:
    """(B, R) log-probs of the response tokens under ``model`` (one forward pass), e.g. the frozen reference.

    The response tokens are the attended tokens from column Q on, so a row's padding after its
    EOS gets 0.
    """
    completion_mask = attention_mask.clone()
    completion_mask[:, :n_query] = 0  # (B, Q+R): the response part of the attention mask
    logits = causal_lm_logits(model, query_response, attention_mask)  # (B, Q+R, V)
    return response_logprobs(logits, query_response, completion_mask, n_query, temperature)


@torch.no_grad()
def batch_response_logprobs(model: nn.Module, batch: SampledBatch, temperature: float, batch_size: int) -> Tensor:
    """(B, R) :func:`model_response_logprobs` of a whole sampled batch, ``batch_size`` rows per forward pass, no gradients."""
    return torch.cat([
        model_response_logprobs(model, batch.query_response[rows], batch.attention_mask[rows], batch.n_query, temperature)
        for rows in chunks(len(batch), batch_size)
    ])


PROMPT_TEXT = "_prompt_text"
"""Column of the tokenised prompt datasets holding the prompt string, for reward functions."""


def tokenize_prompt_records(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, *, max_length: int,
                            max_new_tokens: int, what: str) -> datasets.Dataset:
    """Prompt records (``prompt``, ``prompt_messages``) -> ``prompt_input_ids`` + :data:`PROMPT_TEXT`.

    Prompts are left-truncated to ``max_length − max_new_tokens`` tokens so a response always fits.
    """
    if "prompt" not in ds.column_names:
        raise ValueError(f"{what}: dataset lacks a 'prompt' column (found {ds.column_names}); normalise it first")
    ds = ds.select_columns([c for c in ("prompt", "prompt_messages") if c in ds.column_names])
    ds = ds.add_column(PROMPT_TEXT, list(ds["prompt"]))
    trunc = TruncationConfig(max_length=max_length, max_prompt_length=max_length - max_new_tokens)
    tokenized, _ = tokenize_prompts(ds, tokenizer, trunc)
    return tokenized


def prompt_rows(n: int, size: int, seed: int, update: int) -> list[int]:
    """Row indices of the prompts of ``update`` (0-based) among ``n``: a pure function of (seed, update).

    Epoch e is the permutation drawn from ``seed + e``; batches do not straddle epochs (the last
    partial batch is dropped), so resuming an online trainer needs only its update counter.
    """
    per_epoch = n // size
    epoch, k = divmod(update, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))  # (n,)
    return order[k * size : (k + 1) * size].tolist()
