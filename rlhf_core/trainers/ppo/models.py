"""PPO's models: policy and value under one module, dropout off, a value model when there is no reward model."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from rlhf_core.logprobs import causal_lm_logits
from rlhf_core.models.io import borrow_pad_token_id
from rlhf_core.models.scalar_head import ensure_scalar_head_class, token_scores


class PolicyAndValue(nn.Module):
    """The two trained models under one module, so Accelerate (DDP) wraps a single forward."""

    def __init__(self, policy: PreTrainedModel, value: PreTrainedModel) -> None:
        super().__init__()
        self.policy = policy
        self.value = value

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T) ids and mask -> policy logits (B, T, V) and values (B, T)."""
        return causal_lm_logits(self.policy, input_ids, attention_mask), token_scores(self.value, input_ids, attention_mask)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability of ``model`` to 0 (detail 10), in place.

    Covers ``nn.Dropout`` modules (GPT-2's ``resid/embd/attn_pdrop``), float attributes read
    at forward time (Llama's ``attention_dropout``) and the config, so a saved model reloads
    without dropout too.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for name, value in config.to_dict().items():
            if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
                setattr(config, name, 0.0)
    return model


def value_model_from_policy(policy: PreTrainedModel, pad_token_id: int, seed: int = 0) -> PreTrainedModel:
    """A ``*ForSequenceClassification`` (``num_labels=1``) with the policy's backbone and a new head.

    Used when there is no reward model to copy. The head is drawn from ``seed`` without
    touching the caller's RNG. Any causal LM architecture (``ensure_scalar_head_class``); the
    model is built with the policy's own pad id and gets ``pad_token_id`` afterwards, in memory
    (``borrow_pad_token_id``: built with it, a Llama's embedding would never train that row).
    """
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    ensure_scalar_head_class(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        value = AutoModelForSequenceClassification.from_config(config)
    if value.config.pad_token_id is None:
        borrow_pad_token_id(value, pad_token_id)
    missing, unexpected = value.load_state_dict(policy.state_dict(), strict=False)
    if any(not k.startswith("score.") for k in missing) or any(not k.startswith("lm_head.") for k in unexpected):
        raise ValueError(
            f"cannot build a value model from {type(policy).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            "pass value_model= (an AutoModelForSequenceClassification with num_labels=1)"
        )
    weight = next(policy.parameters())
    return value.to(device=weight.device, dtype=weight.dtype)
