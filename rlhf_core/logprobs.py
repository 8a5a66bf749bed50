"""Log-probabilities of tokens under a causal LM: the ONE implementation every trainer shares.

Conventions (all trainers rely on them):

* Causal shift: the logits at position ``t`` predict token ``t + 1``, so per-token results have ``T - 1``
  columns and column ``t`` is ``log π(input_ids[:, t+1] | input_ids[:, :t+1])``.
* Masks are given in ``input_ids`` coordinates ``(B, T)`` and shifted here (``mask[:, 1:]``), so callers never
  shift by hand.
* Position ids come from the attention mask, so left-padded batches (generation, PPO rollouts) give the same
  log-probs as unpadded sequences.
* Positions outside the mask hold exactly ``0.0``: a masked sum is a plain ``.sum(-1)``. A row's first real
  token is never scored (nothing real precedes it; under left padding only pads would).
* Temperature ``τ`` divides the logits before the softmax, ``log softmax(z / τ)``, as sampling at temperature
  ``τ`` does (PPO rollouts must score tokens under the distribution they were sampled from).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "causal_lm_logits",
    "entropy_from_logits",
    "masked_token_logprobs",
    "packed_causal_lm_logits",
    "packed_scored_token_counts",
    "packed_sequence_logprobs",
    "per_sequence_sum",
    "position_ids_from_attention_mask",
    "selective_log_softmax",
    "sequence_logprobs",
    "token_logprobs",
]


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """``log_softmax(logits)`` gathered at ``index``, without materialising a second ``(..., V)`` tensor.

    ``log softmax(z)_i = z_i − logsumexp(z)``. When autograd records (training), one fused
    ``log_softmax`` + ``gather``: the backward keeps a ``(..., V)`` tensor anyway, and this is ~4× faster
    on CPU than the row loop (measured in bench/train_throughput.py). Without gradients (scoring),
    float32/float64 use the gathered logit minus a row-wise ``logsumexp`` computed one leading row
    at a time, so peak memory stays at one row's size. For half precision the
    ``logsumexp`` shortcut loses too much precision, so each leading row is upcast to float32 and
    log-softmaxed on its own; the result is then float32.

    Args:
        logits: ``(..., V)`` unnormalised scores.
        index: ``(...)`` integer ids in ``[0, V)``, same leading shape as ``logits``.

    Returns:
        ``(...)`` log-probabilities (float32 for half-precision input, else ``logits.dtype``).
    """
    if logits.shape[:-1] != index.shape:
        raise ValueError(
            f"selective_log_softmax: index shape {tuple(index.shape)} must equal logits shape without the "
            f"vocabulary axis {tuple(logits.shape[:-1])}"
        )
    index = index.long()
    if logits.ndim == 1:  # a single distribution: give it a leading axis to loop over
        return selective_log_softmax(logits.unsqueeze(0), index.unsqueeze(0)).squeeze(0)
    if logits.dtype in (torch.float32, torch.float64) and torch.is_grad_enabled() and logits.requires_grad:
        return logits.log_softmax(-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)  # (...)
    if logits.dtype in (torch.float32, torch.float64):
        selected = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)  # (...)
        # Looping over the first axis keeps the logsumexp temporaries to one row's size.
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])  # (...)
        return selected - lse
    rows = [
        row.float().log_softmax(-1).gather(-1, row_index.unsqueeze(-1)).squeeze(-1)  # one leading row: (...)
        for row, row_index in zip(logits, index, strict=True)
    ]
    return torch.stack(rows)


def entropy_from_logits(logits: Tensor, chunk_size: int = 128) -> Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` at every position, for PPO logging.

    ``H(p) = −Σ_v p_v log p_v`` with ``p = softmax(z)``, computed in chunks of ``chunk_size`` flattened
    positions so only one chunk's ``(chunk, V)`` softmax exists at a time.

    Args:
        logits: ``(..., V)`` unnormalised scores.
        chunk_size: positions per chunk (memory/speed trade-off).

    Returns:
        ``(...)`` entropies, float32 for half-precision input.
    """
    if chunk_size < 1:
        raise ValueError(f"entropy_from_logits: chunk_size must be >= 1, got {chunk_size}")
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    parts = []
    for chunk in flat.split(chunk_size, dim=0):
        chunk = chunk.float() if chunk.dtype in (torch.float16, torch.bfloat16) else chunk
        logp = chunk.log_softmax(-1)  # (n, V)
        parts.append(-(logp.exp() * logp).sum(-1))  # (n,)
    return torch.cat(parts).reshape(logits.shape[:-1])


def position_ids_from_attention_mask(attention_mask: Tensor) -> Tensor:
    """Position ids counting only attended tokens: ``[0 0 0 1 2]`` for the left-padded mask ``[0 0 1 1 1]``.

    Args:
        attention_mask: ``(B, T)``, 1 for real tokens and 0 for padding.

    Returns:
        ``(B, T)`` long; padding positions get 0 (their value is irrelevant: nothing attends to them).
    """
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)


def causal_lm_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """One forward pass of a causal LM with mask-derived position ids (left padding safe).

    Args:
        model: a ``transformers`` causal LM (or PEFT wrapper) whose output has ``.logits``.
        input_ids: ``(B, T)`` token ids.
        attention_mask: ``(B, T)``, 1 for real tokens.

    Returns:
        ``(B, T, V)`` logits; row ``t`` predicts token ``t + 1``.
    """
    _check_same_shape(input_ids=input_ids, attention_mask=attention_mask)
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_attention_mask(attention_mask),
        use_cache=False,
    )
    return outputs.logits


def masked_token_logprobs(
    logits: Tensor, input_ids: Tensor, completion_mask: Tensor, temperature: float = 1.0
) -> Tensor:
    """Per-token ``log π(x_{t+1} | x_{≤t})`` from precomputed logits, zero outside ``completion_mask``.

    Lets a trainer reuse one forward pass for both an SFT loss and log-probs.

    Args:
        logits: ``(B, T, V)`` logits of a forward pass over ``input_ids`` (unshifted).
        input_ids: ``(B, T)`` the tokens that were fed in.
        completion_mask: ``(B, T)`` in ``input_ids`` coordinates: 1 where the token's log-prob is wanted.
        temperature: ``τ > 0``; scores ``log softmax(z / τ)``.

    Returns:
        ``(B, T-1)``: column ``t`` is the log-prob of ``input_ids[:, t+1]`` where ``completion_mask[:, t+1]``
        is set, else ``0.0``. The first token of a row never has a log-prob (nothing precedes it).
    """
    _check_same_shape(input_ids=input_ids, completion_mask=completion_mask)
    if logits.ndim != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"masked_token_logprobs: logits must be (B, T, V) with (B, T) = input_ids shape "
            f"{tuple(input_ids.shape)}, got {tuple(logits.shape)}"
        )
    _check_temperature(temperature)
    shifted_logits = logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
    targets = input_ids[:, 1:]  # (B, T-1)
    mask = completion_mask[:, 1:].bool()  # (B, T-1)
    if temperature != 1.0:
        shifted_logits = shifted_logits / temperature
    logps = selective_log_softmax(shifted_logits, targets)  # (B, T-1)
    # where() (not multiply) so non-finite values at ignored positions cannot leak into sums or gradients.
    return torch.where(mask, logps, torch.zeros_like(logps))


def token_logprobs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, *, temperature: float = 1.0
) -> Tensor:
    """``log π(x_{t+1} | x_{≤t})`` of every next token, e.g. for PPO's old/new/reference log-probs.

    Args:
        model: causal LM.
        input_ids: ``(B, T)``; left or right padding.
        attention_mask: ``(B, T)``, 1 for real tokens.
        temperature: ``τ > 0``; logits are divided by ``τ`` before the softmax.

    Returns:
        ``(B, T-1)``: column ``t`` is the log-prob of ``input_ids[:, t+1]``; ``0.0`` where that token is padding
        or is its row's first real token (it has no context: under left padding only pads precede it).
    """
    _check_temperature(temperature)
    logits = causal_lm_logits(model, input_ids, attention_mask)  # (B, T, V)
    return masked_token_logprobs(logits, input_ids, _scorable(attention_mask, attention_mask), temperature)


def sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    average: bool = False,
    temperature: float = 1.0,
) -> Tensor:
    """Log-likelihood of each completion given its prompt: ``log π(y|x) = Σ_t log π(y_t | x, y_<t)``.

    This is the ``log π_θ(y|x)`` of DPO (Rafailov et al. 2023, Eq. 7). With ``average`` it is the per-token
    mean ``(1/|y|) Σ_t log π(y_t | x, y_<t)``, the length-normalised form IPO uses.

    Args:
        model: causal LM.
        input_ids: ``(B, T)`` prompt + completion (+ padding).
        attention_mask: ``(B, T)``, 1 for real tokens.
        completion_mask: ``(B, T)`` in ``input_ids`` coordinates, 1 on completion tokens; intersected with
            ``attention_mask`` so padding never counts (nor a row's first real token, which has no context).
        average: divide by the number of scored completion tokens (at least 1) instead of summing.
        temperature: ``τ > 0`` applied to the logits.

    Returns:
        ``(B,)`` summed (or averaged) completion log-probs, differentiable w.r.t. the model.
    """
    _check_same_shape(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask)
    _check_temperature(temperature)
    mask = _scorable(completion_mask, attention_mask)  # (B, T)
    logits = causal_lm_logits(model, input_ids, attention_mask)  # (B, T, V)
    per_token = masked_token_logprobs(logits, input_ids, mask, temperature)  # (B, T-1)
    total = per_token.sum(-1)  # (B,)
    if average:
        return total / mask[:, 1:].sum(-1).clamp(min=1)
    return total


def packed_causal_lm_logits(model: nn.Module, input_ids: Tensor, position_ids: Tensor) -> Tensor:
    """One forward pass over packed rows (``rlhf_core.data.packing``): ``(R, W)`` -> ``(R, W, V)`` logits.

    No attention mask, on purpose: transformers then reads the sequence boundaries from ``position_ids``
    (a restart at 0) and builds a block-diagonal causal mask. ``use_cache=False`` is required too: with a
    cache (``config.use_cache``, on by default) transformers skips that detection and one row is one sequence.
    """
    _check_same_shape(input_ids=input_ids, position_ids=position_ids)
    return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def per_sequence_sum(values: Tensor, sequence_ids: Tensor, n_sequences: int) -> Tensor:
    """``out[s] = Σ_{t : sequence_ids[t] = s} values[t]``: per-token values summed per packed sequence.

    Args:
        values: ``(R, W')`` numbers (bool counts as 0/1).
        sequence_ids: ``(R, W')`` owner of each position, -1 for none (ignored).
        n_sequences: ``S``.

    Returns:
        ``(S,)`` sums, in ``values``' dtype (float32 for bool).
    """
    _check_same_shape(values=values, sequence_ids=sequence_ids)
    values = values.float() if values.dtype == torch.bool else values
    index = torch.where(sequence_ids >= 0, sequence_ids, n_sequences).flatten()  # (R·W',): -1 -> a spare bucket S
    sums = values.new_zeros(n_sequences + 1).index_add(0, index, values.flatten())  # (S + 1,)
    return sums[:n_sequences]


def packed_sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    position_ids: Tensor,
    completion_mask: Tensor,
    sequence_ids: Tensor,
    n_sequences: int,
    *,
    average: bool = False,
    temperature: float = 1.0,
) -> Tensor:
    """:func:`sequence_logprobs` of ``S`` sequences packed into rows: ``log π(y|x)`` of each, ``(S,)``.

    Equal to ``sequence_logprobs`` on the same sequences padded (up to float rounding): a token is scored
    where it is a completion token and not its sequence's first (``position_ids > 0``), so a sequence's
    first token is never scored from the previous sequence's last logit.

    Args:
        model: causal LM that keeps packed sequences apart (``rlhf_core.trainers.padding_free``).
        input_ids, position_ids, completion_mask, sequence_ids: ``(R, W)`` from ``data.packing.pack_sequences``.
        n_sequences: ``S``.
        average: divide by the number of scored completion tokens (at least 1).
        temperature: ``τ > 0`` applied to the logits.

    Returns:
        ``(S,)`` summed (or averaged) completion log-probs, in the order of ``sequence_ids``.
    """
    _check_temperature(temperature)
    mask = packed_scorable(completion_mask, position_ids, sequence_ids)  # (R, W)
    logits = packed_causal_lm_logits(model, input_ids, position_ids)  # (R, W, V)
    per_token = masked_token_logprobs(logits, input_ids, mask, temperature)  # (R, W-1): column t scores token t+1
    owner = sequence_ids[:, 1:]  # (R, W-1): the sequence of token t+1
    total = per_sequence_sum(per_token, owner, n_sequences)  # (S,)
    if average:
        return total / per_sequence_sum(mask[:, 1:], owner, n_sequences).clamp(min=1).to(total.dtype)
    return total


def packed_scored_token_counts(completion_mask: Tensor, position_ids: Tensor, sequence_ids: Tensor, n_sequences: int) -> Tensor:
    """``(S,)`` number of tokens ``packed_sequence_logprobs`` scores per sequence (at least 1)."""
    mask = packed_scorable(completion_mask, position_ids, sequence_ids)  # (R, W)
    return per_sequence_sum(mask, sequence_ids, n_sequences).long().clamp(min=1)


def packed_scorable(completion_mask: Tensor, position_ids: Tensor, sequence_ids: Tensor) -> Tensor:
    """``(R, W)`` bool: completion tokens of a sequence that have a token of their own sequence before them."""
    return completion_mask.bool() & (position_ids > 0) & (sequence_ids >= 0)


def scored_token_counts(completion_mask: Tensor, attention_mask: Tensor) -> Tensor:
    """``(B,)`` number of completion tokens ``sequence_logprobs`` scores per row (at least 1): its ``average`` divisor."""
    return _scorable(completion_mask, attention_mask).sum(-1).clamp(min=1)


def _scorable(mask: Tensor, attention_mask: Tensor) -> Tensor:
    """``mask`` restricted to real tokens that have at least one real token before them: ``(B, T)`` bool."""
    has_context = position_ids_from_attention_mask(attention_mask) > 0  # (B, T)
    return mask.bool() & attention_mask.bool() & has_context


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(shape != first for shape in shapes.values()):
        raise ValueError(f"expected 2-D (B, T) tensors of one shape, got {shapes}")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

