"""Causal language models: a tiny GPT-2 or Llama built from scratch, or a pretrained one loaded."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rlhf_core.models.io import DType, pretrained_kwargs
from rlhf_core.models.lora import LoraSettings, apply_lora
from rlhf_core.models.tiny_config import TinyModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def build_tiny_causal_lm(tokenizer: PreTrainedTokenizerBase, cfg: TinyModelConfig, seed: int = 0) -> PreTrainedModel:
    """A freshly initialised GPT-2 or Llama with ``len(tokenizer)`` tokens and its pad/bos/eos ids.

    Deterministic given ``seed``; the caller's global RNG state is left untouched.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    ids = dict(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    if cfg.arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=cfg.max_positions,
            n_embd=cfg.hidden_size,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            **ids,
        )
        model_cls = GPT2LMHeadModel
    else:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_head,
            max_position_embeddings=cfg.max_positions,
            attention_dropout=cfg.dropout,
            tie_word_embeddings=True,  # as GPT-2: at this size the embedding is most of the weights
            **ids,
        )
        model_cls = LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):  # seed the init without changing the caller's RNG
        torch.manual_seed(seed)
        return model_cls(config)


def load_causal_lm(
    name_or_path: str,
    *,
    trust_remote_code: bool = False,
    dtype: DType = None,
    lora: LoraSettings | None = None,
) -> PreTrainedModel:
    """Load a causal LM (safetensors only) with ``AutoModelForCausalLM``; wrap it in LoRA if ``lora``.

    ``dtype``: ``None`` keeps the checkpoint's dtype; else ``"auto"``, ``"bfloat16"``, a ``torch.dtype``...
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, **pretrained_kwargs(trust_remote_code=trust_remote_code, dtype=dtype)
    )
    return apply_lora(model, lora, task_type="CAUSAL_LM") if lora is not None else model
