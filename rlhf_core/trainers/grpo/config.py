"""GRPO/RLOO settings: the shared trainer fields (``BaseTrainConfig``) plus sampling, advantage and loss knobs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhf_core.trainers.train_config import BaseTrainConfig

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass
class GRPOConfig(BaseTrainConfig):
    """Critic-free online RL (the ``grpo`` group of ``params.yaml``); names and defaults follow TRL's ``GRPOConfig``.

    Each update draws ``prompts_per_update`` prompts, samples ``num_generations`` (k) responses to
    each, scores them with the reward functions (and/or the reward model), turns the scores into
    advantages within each prompt's group (``advantage``), then runs ``num_iterations`` passes of
    the clipped surrogate (``rlhf_core.rl.grpo_loss``) over shuffled mini-batches. "Steps" are updates.
    """

    output_dir: str = "outputs/grpo"
    learning_rate: float = 3e-4  # TRL's 1e-6 is for pretrained 1B+ models; the tiny default task trains at 3e-4
    lr_scheduler_type: str = "constant"
    warmup_ratio: float = 0.0
    logging_steps: int = 1
    eval_steps: int = 10
    save_steps: int = 10
    max_length: int = 48  # prompts are left-truncated to max_length − max_new_tokens

    max_updates: int = 30
    """Updates (one batch of groups + ``num_iterations`` passes of optimisation each)."""
    prompts_per_update: int = 16
    """Prompts per update and process; each gets ``num_generations`` responses."""
    num_generations: int = 8
    """k: responses per prompt (a group)."""
    mini_batch_size: int = 32
    """Responses per forward/backward pass; an optimizer step sees ``mini_batch_size × gradient_accumulation_steps``."""
    num_iterations: int = 1
    """μ: optimisation passes over each batch (1: the ratio is 1 and clipping never binds, as TRL's default)."""
    advantage: Literal["grpo", "rloo"] = "grpo"
    """``grpo``: reward minus its group's mean, scaled (Shao et al. 2024); ``rloo``: minus the mean of the other k−1
    (Ahmadian et al. 2024)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """``grpo`` only: divide by the group's std, the batch's, or nothing (Dr. GRPO, Liu et al. 2025)."""
    loss_type: str = "dapo"
    """Token aggregation of ``rlhf_core.rl.grpo_loss``: grpo, bnpo, dr_grpo, dapo (TRL 1.16's default), per mini-batch;
    with several processes ``dapo`` divides by the tokens of every process's mini-batch (TRL's ``num_items_in_batch``),
    ``bnpo`` by this process's."""
    epsilon: float = 0.2
    """ε_low of the clipped ratio."""
    epsilon_high: float | None = None
    """ε_high (DAPO's clip-higher); ``None``: ``epsilon``."""
    beta: float = 0.0
    """β of the k3 KL to the reference in the loss; 0 (TRL's default) loads no reference model."""
    reward_model_weight: float = 0.0
    """Weight of the reward model's score beside the reward functions'; 0 (verifiable rewards only): no reward model."""
    adam_epsilon: float = 1e-8
    forward_batch_size: int = 64
    """Rows per no-grad forward pass and per ``generate`` call."""
    max_new_tokens: int = 12
    temperature: float = 1.0
    """τ: sampling temperature, also dividing the logits of every log-prob."""
    eval_do_sample: bool = True
    """Evaluation samples one response per held-out prompt at ``temperature`` from a fixed seed; ``False``: greedy."""
    eval_on_start: bool = True
    """Also evaluate the initial policy (update 0) on a fresh run: the origin of the over-optimisation curve."""

    def __post_init__(self) -> None:
        super().__post_init__()
        positive = ("max_updates", "prompts_per_update", "mini_batch_size", "num_iterations", "forward_batch_size",
                    "max_new_tokens", "temperature", "epsilon", "adam_epsilon")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (advantages compare the responses of a group), got {self.num_generations}")
        if self.advantage not in ("grpo", "rloo"):
            raise ValueError(f"advantage must be 'grpo' or 'rloo', got {self.advantage!r}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {self.scale_rewards!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r} is not one of {list(LOSS_TYPES)}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.epsilon_high is not None and self.epsilon_high <= 0:
            raise ValueError(f"epsilon_high must be > 0 or None, got {self.epsilon_high}")
        step_rows = self.mini_batch_size * self.gradient_accumulation_steps
        if (self.prompts_per_update * self.num_generations) % step_rows:
            raise ValueError(
                f"prompts_per_update × num_generations ({self.prompts_per_update} × {self.num_generations}) must be divisible "
                f"by mini_batch_size × gradient_accumulation_steps ({step_rows})")
        if self.max_new_tokens >= self.max_length:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) must be < max_length ({self.max_length})")
