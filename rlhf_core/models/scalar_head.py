"""Scalar-head models: one number per token (PPO values) or per sequence (rewards).

A reward or value model is a transformers ``*ForSequenceClassification`` with ``num_labels=1``:
a decoder backbone plus a linear ``score`` head that maps each hidden state h_t to a scalar
s_t = w·h_t. For a causal LM architecture transformers has no such class for (about half of
them: Cohere, Granite, OLMoE, CodeGen...), :func:`ensure_scalar_head_class` registers a generic
one built the same way (the architecture's backbone from ``AutoModel`` and a ``score`` head). The reward of a sequence is s_t at its last non-pad token (Ouyang et al. 2022, §3.5;
Stiennon et al. 2020); PPO's value estimate V(s_t) uses every s_t.

The helpers read padding from the attention mask, never from ``pad_token_id``, so they are
right for left and right padding and for tokenizers whose pad token is their eos token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rlhf_core.logprobs import position_ids_from_attention_mask as position_ids_from_mask  # one definition, shared
from rlhf_core.models.io import DType, borrow_pad_token_id, pretrained_kwargs
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
    from ``seed`` without touching the caller's RNG; a saved reward model loads its own head. Any
    causal LM architecture works (:func:`ensure_scalar_head_class`).
    Without a pad id in the checkpoint, ``config.pad_token_id`` borrows its eos id, in memory only
    (``io.borrow_pad_token_id``), because transformers' sequence-classification forward refuses
    batches larger than 1 without one; the scores of :func:`sequence_scores` do not depend on it.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    kwargs = pretrained_kwargs(trust_remote_code=trust_remote_code, dtype=dtype)
    ensure_scalar_head_class(AutoConfig.from_pretrained(name_or_path, trust_remote_code=kwargs["trust_remote_code"]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1, **kwargs)
    if getattr(model.config, "pad_token_id", None) is None:
        eos = getattr(model.config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
        if eos is None:
            raise ValueError(
                f"{name_or_path}: config has neither pad_token_id nor eos_token_id; set pad_token_id in config.json"
            )
        borrow_pad_token_id(model, eos)
    return apply_lora(model, lora, task_type="SEQ_CLS") if lora is not None else model


def ensure_scalar_head_class(config) -> type:
    """The ``AutoModelForSequenceClassification`` class for ``config``'s architecture, registering one if needed.

    transformers has a ``*ForSequenceClassification`` for about half of its causal LM
    architectures. For the others, a class is built and registered (in this process) the way
    transformers' own ``GenericForSequenceClassification`` is: the architecture's
    ``*PreTrainedModel`` (its weight init and loading rules) holding the ``AutoModel`` backbone
    under the causal LM's ``base_model_prefix`` (so a causal LM checkpoint's backbone weights
    load into it) and a bias-free linear ``score`` head. Its forward passes the backbone only
    the arguments it accepts and pools at the last token of the attention mask. The class is
    named ``<Arch>ForSequenceClassification``; saved, it loads again through this function
    (:func:`load_reward_model` calls it first).

    Raises:
        ValueError: for a model type with no causal LM or no backbone class in transformers.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
        MODEL_MAPPING,
    )

    key = type(config)
    if key in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[key]
    if "AutoModelForSequenceClassification" in (getattr(config, "auto_map", None) or {}):
        return AutoModelForSequenceClassification  # the checkpoint's own code (trust_remote_code) provides it
    if key not in MODEL_FOR_CAUSAL_LM_MAPPING or key not in MODEL_MAPPING:
        raise ValueError(
            f"model type {config.model_type!r}: transformers has no causal LM and backbone classes for it, "
            "so no reward/value head can be attached"
        )
    cls = _generic_scalar_head_class(MODEL_FOR_CAUSAL_LM_MAPPING[key])
    AutoModelForSequenceClassification.register(key, cls, exist_ok=True)
    return cls


def _generic_scalar_head_class(causal_lm_class: type) -> type:
    """A ``*ForSequenceClassification`` for the architecture of ``causal_lm_class`` (see above)."""
    import inspect

    from transformers import AutoModel, PreTrainedModel
    from transformers.modeling_outputs import SequenceClassifierOutputWithPast

    bases = [c for c in causal_lm_class.__mro__[1:]
             if issubclass(c, PreTrainedModel) and c is not PreTrainedModel and c.__name__.endswith("PreTrainedModel")]
    if not bases:
        raise ValueError(f"{causal_lm_class.__name__}: no *PreTrainedModel base class to build a scalar head on")
    prefix = causal_lm_class.base_model_prefix

    def __init__(self, config) -> None:
        bases[0].__init__(self, config)
        self.num_labels = config.num_labels
        setattr(self, prefix, AutoModel.from_config(config))
        self.score = torch.nn.Linear(config.get_text_config().hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **_ignored):
        backbone = getattr(self, prefix)
        accepted = inspect.signature(backbone.forward).parameters
        open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        optional = {"attention_mask": attention_mask, "position_ids": position_ids, "inputs_embeds": inputs_embeds,
                    "use_cache": False}
        kwargs = {k: v for k, v in optional.items() if v is not None and (open_kwargs or k in accepted)}
        hidden = backbone(input_ids=input_ids, **kwargs).last_hidden_state  # (B, T, H)
        logits = self.score(hidden)  # (B, T, num_labels)
        if attention_mask is not None:
            last = last_token_index(attention_mask)  # (B,)
        else:
            last = torch.full((logits.shape[0],), logits.shape[1] - 1, device=logits.device)
        pooled = logits[torch.arange(logits.shape[0], device=logits.device), last]  # (B, num_labels)
        return SequenceClassifierOutputWithPast(logits=pooled)

    name = causal_lm_class.__name__.removesuffix("ForCausalLM") + "ForSequenceClassification"
    return type(name, (bases[0],), {"base_model_prefix": prefix, "__init__": __init__, "forward": forward,
                                     "__module__": __name__})


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


def token_scores(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scalar head applied at every position: s_t = w·h_t.

    The model is called through its own ``forward`` (so peft adapters, DDP/FSDP/DeepSpeed wrappers
    and their hooks all work) with ``position_ids`` from :func:`position_ids_from_mask`; a forward
    hook on ``score`` captures its per-token output before transformers pools it to one token.
    Packed rows (``rlhf_core.data.packing``) pass ``attention_mask=None`` and their ``position_ids``:
    transformers then keeps the sequences apart (see ``logprobs.packed_causal_lm_logits``).

    Args:
        model: a decoder ``*ForSequenceClassification`` with ``num_labels=1`` (possibly wrapped).
        input_ids: (B, T) token ids.
        attention_mask: (B, T), 1 for real tokens, 0 for padding; ``None`` for packed rows.
        position_ids: (B, T) packed rows' position ids (only with ``attention_mask=None``).

    Returns:
        (B, T) scores in the model's dtype; values at padded positions are meaningless (mask them).
    """
    if (attention_mask is None) == (position_ids is None):
        raise ValueError("token_scores: pass an attention_mask (padded batch) or position_ids (packed rows), not both")
    given = attention_mask if attention_mask is not None else position_ids
    if input_ids.shape != given.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask/position_ids {tuple(given.shape)} differ in shape"
        )
    if attention_mask is not None:
        kwargs = {"attention_mask": attention_mask, "position_ids": position_ids_from_mask(attention_mask)}
    else:  # no cache: with one (config.use_cache) transformers skips packed-sequence detection
        kwargs = {"position_ids": position_ids, "use_cache": False}
    captured: list[torch.Tensor] = []
    handle = _score_head(model).register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        model(input_ids=input_ids, **kwargs)
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


def packed_sequence_scores(
    model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, last_index: torch.Tensor
) -> torch.Tensor:
    """:func:`sequence_scores` of sequences packed into rows (``rlhf_core.data.packing.pack_sequences``).

    Args:
        input_ids, position_ids: (R, W) packed rows.
        last_index: (S,) flat index ``row · W + column`` of each sequence's last token.

    Returns:
        (S,) scores, the score at each sequence's last token.
    """
    scores = token_scores(model, input_ids, None, position_ids=position_ids)  # (R, W)
    return scores.flatten()[last_index]  # (R·W,) -> (S,)
