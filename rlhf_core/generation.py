"""Sampling responses from a causal LM: left-padded queries in, EOS-truncated responses out.

Used by the PPO rollouts and by the evaluation stage. Conventions:

* Queries are LEFT-padded to one width ``Q`` so every prompt ends at column ``Q - 1`` and the
  response starts at column ``Q`` for every row; ``query_mask`` marks real prompt tokens.
* A response ends at its FIRST EOS token, which is kept (it is the token the reward model scores
  and the one PPO puts the score on); everything after it is replaced by the pad token and
  masked out. A response that never produced EOS keeps all ``max_new_tokens`` tokens.
* Sampling is plain ancestral sampling at ``temperature``: ``top_k=0`` and ``top_p=1.0`` switch
  the truncating warpers off (HF adds ``TopKLogitsWarper`` only for ``top_k != 0``), and the
  model's own ``generation_config`` cannot add penalties (they are set to neutral values here),
  so ``log softmax(logits / temperature)`` is exactly the distribution the tokens came from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.data.collate import pad


@dataclass
class GenerationOutput:
    """Responses to ``N`` prompts. Tensors live on the model's device.

    ``torch.cat([query_ids, response_ids], 1)`` with ``torch.cat([query_mask, response_mask], 1)``
    is the (N, Q + R) batch to score with the policy, reference, value or reward model.
    """

    query_ids: torch.Tensor
    """(N, Q) prompt ids, left-padded with the pad token."""
    query_mask: torch.Tensor
    """(N, Q) long, 1 on real prompt tokens."""
    response_ids: torch.Tensor
    """(N, R) response ids up to and including the first EOS, then pad tokens; R <= max_new_tokens."""
    response_mask: torch.Tensor
    """(N, R) long, 1 on response tokens (the first EOS included), 0 after it. Each row has >= 1 token."""
    has_eos: torch.Tensor
    """(N,) bool, True where the response ended with EOS (False: cut at ``max_new_tokens``)."""
    texts: list[str]
    """Decoded responses, special tokens (the EOS) skipped."""


def truncate_at_eos(response_ids: torch.Tensor, eos_token_id: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep each row up to its first EOS; pad and mask the rest.

    Works when ``pad_token_id == eos_token_id`` (GPT-2 style tokenizers): only the FIRST EOS
    counts, later ones are padding.

    Args:
        response_ids: (B, R) generated ids (prompt excluded).
        eos_token_id: id that ends a response.
        pad_token_id: id written after the first EOS.

    Returns:
        ``(ids, mask, has_eos)``: (B, R) ids with pad after the first EOS, (B, R) long mask that
        is 1 up to and including the first EOS (all ones without EOS), (B,) bool.
    """
    if response_ids.dim() != 2:
        raise ValueError(f"truncate_at_eos: expected (B, R) response ids, got shape {tuple(response_ids.shape)}")
    is_eos = response_ids == eos_token_id  # (B, R)
    has_eos = is_eos.any(dim=1)  # (B,)
    width = response_ids.shape[1]
    positions = torch.arange(width, device=response_ids.device).expand_as(response_ids)  # (B, R)
    # Index of the first EOS, or R (past the end) when there is none.
    first_eos = torch.where(is_eos, positions, width).amin(dim=1, keepdim=True)  # (B, 1)
    keep = positions <= first_eos  # (B, R)
    ids = torch.where(keep, response_ids, pad_token_id)
    return ids, keep.long(), has_eos


def _generation_config(
    *, max_new_tokens: int, temperature: float, top_k: int, top_p: float, do_sample: bool, pad_token_id: int, eos_token_id: int
) -> GenerationConfig:
    """Only the requested warpers; neutral values for every logits processor a checkpoint could switch on."""
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p) if do_sample else {}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        do_sample=do_sample,
        num_beams=1,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        **sampling,
    )


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """With a seed: draw from a fresh RNG and leave the caller's RNG untouched. Without: use the global RNG."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _check_args(prompt_ids: list[list[int]], max_new_tokens: int, temperature: float, top_k: int, top_p: float, batch_size: int) -> None:
    if not prompt_ids:
        raise ValueError("generate: prompt_ids is empty")
    empty = [i for i, p in enumerate(prompt_ids) if len(p) == 0]
    if empty:
        raise ValueError(f"generate: prompts {empty[:10]} have no tokens")
    if max_new_tokens < 1 or batch_size < 1 or top_k < 0:
        raise ValueError(f"generate: need max_new_tokens >= 1, batch_size >= 1, top_k >= 0; got {max_new_tokens=}, {batch_size=}, {top_k=}")
    if not temperature > 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: need temperature > 0 and top_p in (0, 1]; got {temperature=}, {top_p=}")


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
    batch_size: int = 32,
    seed: int | None = None,
) -> GenerationOutput:
    """Generate one response per prompt with HF ``model.generate``, in batches of ``batch_size``.

    All prompts are left-padded to the longest one first, so every batch has the same query
    width ``Q`` and the outputs concatenate; responses are right-padded to the longest, ``R``.
    Attention masks are passed, so left padding does not change a prompt's output (transformers
    derives position ids from the mask during generation).

    Args:
        model: a causal LM (put it in eval mode for deterministic greedy decoding with dropout).
        tokenizer: supplies ``pad_token_id``, ``eos_token_id`` and decoding.
        prompt_ids: N token-id lists, each non-empty.
        max_new_tokens: response budget in tokens.
        temperature: τ > 0; sampling from ``softmax(logits / τ)``. Ignored when greedy.
        top_k: 0 disables top-k filtering.
        top_p: 1.0 disables nucleus filtering.
        do_sample: False for greedy decoding.
        batch_size: prompts per ``model.generate`` call.
        seed: sample from a fresh RNG seeded with this and restore the caller's RNG afterwards;
            ``None`` draws from (and advances) the global torch RNG.

    Returns:
        A :class:`GenerationOutput`.
    """
    _check_args(prompt_ids, max_new_tokens, temperature, top_k, top_p, batch_size)
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad_id is None or eos_id is None:
        raise ValueError(f"generate: the tokenizer needs a pad and an eos token, got pad={pad_id}, eos={eos_id}")
    device = next(model.parameters()).device
    config = _generation_config(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                do_sample=do_sample, pad_token_id=pad_id, eos_token_id=eos_id)
    query_ids = pad(prompt_ids, pad_id, left=True).to(device)  # (N, Q)
    query_mask = pad([[1] * len(p) for p in prompt_ids], 0, length=query_ids.shape[1], left=True).to(device)  # (N, Q)
    width = query_ids.shape[1]
    chunks: list[torch.Tensor] = []
    with _seeded(seed, device):
        for start in range(0, len(prompt_ids), batch_size):
            ids, mask = query_ids[start:start + batch_size], query_mask[start:start + batch_size]  # (b, Q)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)  # (b, Q + r)
            chunks.append(out[:, width:])  # (b, r): the response part only
    longest = max(c.shape[1] for c in chunks)
    raw = torch.cat([torch.nn.functional.pad(c, (0, longest - c.shape[1]), value=pad_id) for c in chunks])  # (N, R)
    response_ids, response_mask, has_eos = truncate_at_eos(raw, eos_id, pad_id)
    lengths = response_mask.sum(dim=1).tolist()
    kept = [row[:n] for row, n in zip(response_ids.cpu().tolist(), lengths)]  # padding never reaches the decoder
    texts = tokenizer.batch_decode(kept, skip_special_tokens=True)
    return GenerationOutput(query_ids, query_mask, response_ids, response_mask, has_eos, texts)
