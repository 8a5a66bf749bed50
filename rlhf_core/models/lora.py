"""LoRA adapters through peft (Hu et al. 2021: W' = W + (alpha / r) · B A, with B, A of rank r)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

TaskType = Literal["CAUSAL_LM", "SEQ_CLS"]
FALLBACK_TARGET_MODULES = ["c_attn"]
"""GPT-2's fused q/k/v projection: used when peft knows no default for the architecture."""


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (a ``lora`` group inside a trainer's ``params.yaml`` section)."""

    r: int = 8
    """Rank r of the update B A."""
    alpha: float = 16
    """Scale α: the update is multiplied by α / r."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: list[str] | None = None
    """Module names to adapt; ``None``: peft's default for the architecture (else GPT-2's ``c_attn``)."""

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"lora.r must be > 0, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("lora.target_modules must be null (peft's default) or a non-empty list")


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """peft's default LoRA targets for ``model``'s architecture, else :data:`FALLBACK_TARGET_MODULES`."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULTS:
        return list(DEFAULTS[model_type])
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if not set(FALLBACK_TARGET_MODULES) & names:
        raise ValueError(
            f"peft has no default LoRA target modules for model_type {model_type!r} and the model has no "
            f"{FALLBACK_TARGET_MODULES} module; set lora.target_modules (e.g. the attention projections)"
        )
    return list(FALLBACK_TARGET_MODULES)


def apply_lora(model: torch.nn.Module, settings: LoraSettings, task_type: TaskType = "CAUSAL_LM") -> torch.nn.Module:
    """Wrap ``model`` in a peft ``PeftModel`` whose only trainable weights are the adapters.

    With ``task_type="SEQ_CLS"`` peft also trains (and saves) the fresh ``score`` head.
    """
    from peft import LoraConfig, get_peft_model

    if task_type not in ("CAUSAL_LM", "SEQ_CLS"):
        raise ValueError(f"task_type must be 'CAUSAL_LM' or 'SEQ_CLS', got {task_type!r}")
    targets = settings.target_modules or default_target_modules(model)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        task_type=task_type,
        # GPT-2 stores weights as Conv1D (in, out); telling peft up front avoids its warning.
        fan_in_fan_out=getattr(getattr(model, "config", None), "model_type", None) == "gpt2",
    )
    return get_peft_model(model, config)
