"""Optional LoRA for any trainer: wrap the model with peft adapters when settings are given."""

from __future__ import annotations

from transformers import PreTrainedModel

from rlhf_core.models.lora import LoraSettings, apply_lora


def maybe_apply_lora(model: PreTrainedModel, settings: LoraSettings | None, *, task_type: str) -> PreTrainedModel:
    if settings is None or hasattr(model, "peft_config"):  # no LoRA asked, or adapters already attached
        return model
    return apply_lora(model, settings, task_type=task_type)
