"""Scalar-head models: one number per token (PPO values) or per sequence (rewards).

A reward or value model is a transformers ``*ForSequenceClassification`` with ``num_labels=1``:
a decoder backbone plus a linear ``score`` head that maps each hidden state h_t to a scalar
s_t = w·h_t. The reward of a sequence is s_t at its last non-pad token (Ouyang et al. 2022, §3.5;
Stiennon et al. 2020); PPO's value estimate V(s_t) uses every s_t.

The helpers read padding from the attention mask, never from ``pad_token_id``, so they are
right for left and right padding and for tokenizers whose pad token is their eos token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rlhf_core.logprobs import position_ids_from_attention_mask as position_ids_from_mask  # one definition, shared
from rlhf_core.models.io import DType, pretrained_kwargs
from rlhf_core.models.lora import LoraSettings, apply_lora

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def load_reward_model(
    name_or_path: str,
    *,
    trust_remote_code: bool = False,
    dtype: DType = None,
    lora: LoraSettings | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """Load a scalar-head model (``AutoModelForSequenceClassification``, ``num_labels=1``).

    A causal-LM checkpoint (e.g. the SFT model) gets a freshly initialised ``score`` head, drawn
    from ``seed`` without touching the caller's RNG; a saved reward model loads its own head.
    ``config.pad_token_id`` is set (the checkpoint's pad id, else its eos id) because transformers'
    sequence-classification forward refuses batches larger than 1 without one; the scores of
    :func:`sequence_scores` do not depend on its value.
    """
    from transformers import AutoModelForSequenceClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=1, **pretrained_kwargs(trust_remote_code=trust_remote_code, dtype=dtype)
        )
    if getattr(model.config, "pad_token_id", None) is None:
        eos = getattr(model.config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
        if eos is None:
            raise ValueError(
                f"{name_or_path}: config has neither pad_token_id nor eos_token_id; set pad_token_id in config.json"
            )
        model.config.pad_token_id = eos
    return apply_lora(model, lora, task_type="SEQ_CLS") if lora is not None else model


def last_token_index(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Index of the last non-pad token of each row.

    Args:
        attention_mask: (B, T), 1 for real tokens and 0 for padding (left, right, or both).

    Returns:
        (B,) long tensor: max{t : mask[b, t] = 1} for each row b.

    Raises:
        ValueError: if a row has no real token.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, T), got shape {tuple(attention_mask.shape)}")
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (T,)
    index = torch.where(attention_mask.bool(), positions, -1).amax(dim=-1)  # (B,)
    if (index < 0).any():
        raise ValueError(f"attention_mask rows {torch.nonzero(index < 0).flatten().tolist()} have no real token")
    return index


def _score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The ``score`` linear layer, looked up through peft/DDP/``torch.compile`` wrappers.

    peft's ``PeftModel`` forwards attribute access to the wrapped model (and returns its
    ``ModulesToSaveWrapper`` around ``score`` for SEQ_CLS adapters); DDP and DeepSpeed keep the
    model in ``.module``, ``torch.compile`` in ``._orig_mod``.
    """
    seen = model
    while True:
        head = getattr(seen, "score", None)
        if isinstance(head, torch.nn.Module):
            return head
        inner = getattr(seen, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(seen, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            raise ValueError(
                f"{type(model).__name__} has no 'score' head; load it with load_reward_model "
                "(AutoModelForSequenceClassification, num_labels=1)"
            )
        seen = inner


def token_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head applied at every position: s_t = w·h_t.

    The model is called through its own ``forward`` (so peft adapters, DDP/FSDP/DeepSpeed wrappers
    and their hooks all work) with ``position_ids`` from :func:`position_ids_from_mask`; a forward
    hook on ``score`` captures its per-token output before transformers pools it to one token.

    Args:
        model: a decoder ``*ForSequenceClassification`` with ``num_labels=1`` (possibly wrapped).
        input_ids: (B, T) token ids.
        attention_mask: (B, T), 1 for real tokens, 0 for padding.

    Returns:
        (B, T) scores in the model's dtype; values at padded positions are meaningless (mask them).
    """
    if input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} differ in shape"
        )
    captured: list[torch.Tensor] = []
    handle = _score_head(model).register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask))
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected the score head to run once per forward, it ran {len(captured)} times")
    scores = captured[0]
    if scores.shape != (*input_ids.shape, 1):
        raise ValueError(
            f"score head output has shape {tuple(scores.shape)}, expected (B, T, 1) = {(*input_ids.shape, 1)}: "
            "token_scores needs a decoder model whose head is applied at every position, with num_labels=1"
        )
    return scores.squeeze(-1)  # (B, T, 1) -> (B, T)


def sequence_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reward r(x, y): the score at each row's last non-pad token.

    Args:
        input_ids: (B, T) token ids, left or right padded.
        attention_mask: (B, T), 1 for real tokens, 0 for padding.

    Returns:
        (B,) scores.
    """
    scores = token_scores(model, input_ids, attention_mask)  # (B, T)
    last = last_token_index(attention_mask)  # (B,)
    return scores.gather(1, last.unsqueeze(1)).squeeze(1)  # (B, 1) -> (B,)
