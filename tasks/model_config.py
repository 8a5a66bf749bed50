"""The ``model`` group of ``params.yaml``: the base model every training stage starts from.

Shared by ``prepare`` (the tokenizer) and the training stages (the model), so it lives apart
from both (stage modules do not import each other).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    """The ``model`` group: the base model of every training stage."""

    name_or_path: str | None = None
    """A local folder or hub name of a causal LM; ``null``: a tiny model trained from scratch."""
    trust_remote_code: bool = False
    dtype: str | None = None
    tokenizer_vocab_size: int = 512
    """Vocabulary of the tokenizer trained from scratch (only when ``name_or_path`` is null)."""
    tiny: dict[str, Any] = field(default_factory=dict)
    """``rlhf_core.models.TinyModelConfig`` fields for the from-scratch model."""
