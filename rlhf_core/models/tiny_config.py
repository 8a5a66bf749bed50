"""The from-scratch model's shape (``model.tiny`` in ``params.yaml``): a plain dataclass, no torch, so that checking
``params.yaml`` (``tasks.preflight``) does not import what building the model needs (``causal_lm``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass
class TinyModelConfig:
    """Shape of the from-scratch model (``model.tiny`` in ``params.yaml``)."""

    arch: Literal["gpt2", "llama"] = "gpt2"
    """``gpt2``: learned absolute positions, GELU MLP; ``llama``: RoPE, RMSNorm, SwiGLU MLP."""
    n_layer: int = 2
    hidden_size: int = 128
    n_head: int = 4
    """Attention heads; ``hidden_size`` must be divisible by it."""
    max_positions: int = 64
    """Longest sequence (prompt + completion) the model accepts."""
    dropout: float = 0.0
    """Dropout on embeddings, residuals and attention (GPT-2) or attention only (Llama)."""

    def __post_init__(self) -> None:
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"arch must be 'gpt2' or 'llama', got {self.arch!r}")
        for name in ("n_layer", "hidden_size", "n_head", "max_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.n_head:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by n_head ({self.n_head})")
        if self.arch == "llama" and (self.hidden_size // self.n_head) % 2:
            raise ValueError(
                "llama needs an even head size for rotary embeddings; "
                f"hidden_size/n_head = {self.hidden_size // self.n_head}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def intermediate_size(self) -> int:
        """Llama's MLP width: 8/3 · hidden_size rounded up to a multiple of 64 (Llama's rule, small here)."""
        return 64 * math.ceil(8 * self.hidden_size / 3 / 64)
