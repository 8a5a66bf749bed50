"""Models and tokenizers: from-scratch tiny models, pretrained loading, scalar heads, LoRA, saving.

All loaders use safetensors only and leave ``trust_remote_code`` off unless the caller sets it.

Names are re-exported lazily (PEP 562): importing the package, or a light submodule such as ``lora``
(whose ``LoraSettings`` the trainer configs hold), does not import ``torch`` or ``transformers``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlhf_core.lazy_exports import lazy_exports

_EXPORTS: dict[str, str] = {
    "TinyModelConfig": "tiny_config",
    "build_tiny_causal_lm": "causal_lm",
    "load_causal_lm": "causal_lm",
    "save_model": "io",
    "LoraSettings": "lora",
    "apply_lora": "lora",
    "last_token_index": "scalar_head",
    "load_reward_model": "scalar_head",
    "position_ids_from_mask": "scalar_head",
    "sequence_scores": "scalar_head",
    "token_scores": "scalar_head",
    "CHAT_TEMPLATE": "tokenizer",
    "load_tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # also what tests/test_stage_deps.py follows to the submodules
    from rlhf_core.models.causal_lm import build_tiny_causal_lm, load_causal_lm
    from rlhf_core.models.io import save_model
    from rlhf_core.models.lora import LoraSettings, apply_lora
    from rlhf_core.models.scalar_head import (
        last_token_index,
        load_reward_model,
        position_ids_from_mask,
        sequence_scores,
        token_scores,
    )
    from rlhf_core.models.tiny_config import TinyModelConfig
    from rlhf_core.models.tokenizer import CHAT_TEMPLATE, load_tokenizer, train_tokenizer

__getattr__ = lazy_exports(__name__, _EXPORTS)
