"""The held-out prompts policies are judged on, and how they are sampled (``evaluate`` group).

Shared by ``evaluate`` (every trained policy side by side) and ``promote`` (challenger against
the champion in service), so both judge on the same prompts with the same sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.workspace import Workspace


@dataclass
class EvaluateConfig:
    """The ``evaluate`` group of ``params.yaml``."""

    seed: int = 0
    max_prompts: int = 200
    """The first this many held-out prompts (fewer when some leave no room for a response)."""
    samples_per_prompt: int = 4
    """k responses sampled per prompt and policy; means and intervals are over prompts × samples
    (two-level bootstrap), win rates pair sample j with SFT's sample j of the same prompt."""
    max_new_tokens: int = 16
    temperature: float = 1.0
    """Sampling temperature; at 1.0 the KL estimate is the KL of the policy itself."""
    batch_size: int = 64
    n_samples_logged: int = 24

    def __post_init__(self) -> None:
        for name in ("max_prompts", "max_new_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclass
class HeldOutPrompts:
    prompts: list[str]
    messages: list[Any]
    ids: list[list[int]]
    """Token ids in the run's tokenizer."""
    n_too_long: int
    """Prompts left out: no room for a response within the models' context length."""


def evaluate_config(params: dict[str, Any], ws: Workspace) -> tuple[EvaluateConfig, dict[str, int]]:
    """The ``evaluate`` group, its ``auto`` lengths resolved (``tasks.lengths``), and the lengths it resolved."""
    from tasks.lengths import with_auto_lengths
    from tasks.params import typed

    params, lengths = with_auto_lengths(params, ws, "evaluate")
    return typed(params, "evaluate", EvaluateConfig), lengths


def context_length(model) -> int:
    config = model.config
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048))


def held_out_prompts(ws: Workspace, cfg: EvaluateConfig, tokenizer, max_length: int) -> HeldOutPrompts:
    """The first ``cfg.max_prompts`` held-out prompts that leave room for ``max_new_tokens`` within ``max_length``."""
    from rlhf_core.data.tokenize import encode_prompts
    from tasks.stage_main import StageError
    from tasks.training_io import load_split

    ds = load_split(ws, "prompts")
    ds = ds.select(range(min(cfg.max_prompts, len(ds))))
    prompts, messages = list(ds["prompt"]), list(ds["prompt_messages"])  # whole columns: row reads are slow
    encoded = encode_prompts(tokenizer, prompts, messages)
    keep = [i for i, ids in enumerate(encoded) if len(ids) + cfg.max_new_tokens <= max_length]
    if not keep:
        raise StageError(f"every held-out prompt is longer than {max_length - cfg.max_new_tokens} tokens")
    return HeldOutPrompts(
        prompts=[prompts[i] for i in keep], messages=[messages[i] for i in keep],
        ids=[encoded[i] for i in keep], n_too_long=len(encoded) - len(keep),
    )
