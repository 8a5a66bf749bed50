"""Models and tokenizers: from-scratch tiny models, pretrained loading, scalar heads, LoRA, saving.

All loaders use safetensors only and leave ``trust_remote_code`` off unless the caller sets it.
"""

from rlhf_core.models.causal_lm import TinyModelConfig, build_tiny_causal_lm, load_causal_lm
from rlhf_core.models.io import save_model
from rlhf_core.models.lora import LoraSettings, apply_lora
from rlhf_core.models.scalar_head import (
    last_token_index,
    load_reward_model,
    position_ids_from_mask,
    sequence_scores,
    token_scores,
)
from rlhf_core.models.tokenizer import CHAT_TEMPLATE, load_tokenizer, train_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "LoraSettings",
    "TinyModelConfig",
    "apply_lora",
    "build_tiny_causal_lm",
    "last_token_index",
    "load_causal_lm",
    "load_reward_model",
    "load_tokenizer",
    "position_ids_from_mask",
    "save_model",
    "sequence_scores",
    "token_scores",
    "train_tokenizer",
]
