"""PPO's settings: the shared trainer fields (``BaseTrainConfig``) plus the rollout, reward, KL and loss knobs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from rlhf_core.trainers.train_config import BaseTrainConfig

KLEstimator = Literal["k1", "k2", "k3"]
"""The per-token KL estimators: the keys of ``rlhf_core.rl.KL_ESTIMATORS`` (torch-side; ``tests/test_rl.py`` checks)."""


@dataclass
class PPOConfig(BaseTrainConfig):
    """PPO settings (the ``ppo`` group of ``params.yaml``). Symbols and detail numbers as in ``rlhf_core.trainers.ppo``.

    The fields every trainer has (output, seed, optimiser, schedule, logging, checkpoints, precision,
    ``max_length``) are :class:`~rlhf_core.trainers.train_config.BaseTrainConfig`'s; here "steps" are PPO
    updates. Defaults are those of the embedded default (a tiny model on the synthetic task, where
    they raise the gold reward in 20 updates; see ``tests/test_ppo.py``) and of TRL/Huang et al.
    otherwise.
    """

    # Shared fields with PPO's defaults (only the default differs; meaning and checks are BaseTrainConfig's).
    output_dir: str = "outputs/ppo"
    learning_rate: float = 1e-4  # one Adam for policy and value; pretrained 100M+ models usually want 1e-6..1e-5
    lr_scheduler_type: str = "constant"  # stepped once per update over max_updates (detail 14)
    warmup_ratio: float = 0.0
    logging_steps: int = 1
    eval_steps: int = 10
    save_steps: int = 10
    max_length: int = 48  # prompts are left-truncated to max_length − max_new_tokens

    max_updates: int = 30
    """PPO updates (one rollout batch + ``ppo_epochs`` epochs of optimisation each)."""
    rollout_batch_size: int = 64
    """Prompts (one response each) per update and process."""
    mini_batch_size: int = 16
    """Responses per forward/backward pass during optimisation; an optimizer step sees
    ``mini_batch_size × gradient_accumulation_steps`` responses (detail 11)."""
    ppo_epochs: int = 4
    """K: passes over each rollout batch."""
    forward_batch_size: int = 64
    """Rows per no-grad forward pass and per ``generate`` call (rollouts, scoring, evaluation)."""
    adam_epsilon: float = 1e-5
    """Adam ε (detail 14)."""
    max_new_tokens: int = 12
    """Response budget; responses without EOS within it are penalised (``missing_eos_penalty``)."""
    temperature: float = 1.0
    """τ: sampling temperature of rollouts, also dividing the logits of every log-prob (detail 4)."""
    missing_eos_penalty: float | None = 1.0
    """Penalty for a response without EOS (detail 3); ``None``: no penalty."""
    missing_eos_mode: Literal["subtract", "replace"] = "subtract"
    """``subtract``: ``s − penalty`` (TRL); ``replace``: ``s = −penalty`` (lm-human-preferences)."""
    normalize_reward: bool = True
    """Fit gain/bias on the initial policy's samples so their scores have mean 0, std 1 (detail 1)."""
    reward_norm_batches: int = 2
    """Rollout batches of the initial policy used to fit the gain and bias."""
    reward_model_weight: float = 1.0
    """w_RM: weight of the reward model's score in ``s = w_RM·r_φ + w_fn·f`` (ignored without a reward model)."""
    reward_fn_weight: float = 1.0
    """w_fn: weight of the Python reward function (ignored without one)."""
    whiten_rewards: bool = False
    """Rescale the shaped rewards to unit variance per batch, mean kept (detail 5)."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 per batch (detail 6)."""
    kl_control: Literal["fixed", "adaptive"] = "fixed"
    """β fixed at ``kl_coef`` or adapted toward ``kl_target`` (detail 9)."""
    kl_coef: float = 0.2
    """β (initial β when adaptive): weight of the per-token KL penalty."""
    kl_target: float = 6.0
    """KL_target in nats per response for the adaptive controller."""
    kl_horizon: int = 10_000
    """H in samples for the adaptive controller."""
    kl_estimator: KLEstimator = "k1"
    """Per-token KL estimator in the reward: ``k1``, ``k2`` or ``k3`` (``rl.kl_penalty``)."""
    gamma: float = 1.0
    """γ: discount."""
    lam: float = 0.95
    """λ: GAE parameter."""
    clip_range: float = 0.2
    """ε: policy ratio clip."""
    clip_range_value: float = 0.2
    """ε_v: value clip around the rollout values (detail 8)."""
    vf_coef: float = 0.1
    """c_1: weight of the value loss in ``L = L_policy + c_1·L_value``."""
    eval_on_start: bool = True
    """Also evaluate the initial policy (update 0) on a fresh run: the origin of the over-optimisation curve."""
    eval_do_sample: bool = True
    """Evaluation samples at ``temperature`` from a fixed seed; ``False``: greedy decoding."""
    n_eval_samples: int = 4
    """Decoded samples (prompt, response, score, KL, gold) of the first held-out prompts, the same prompts at
    every evaluation, kept in the result and passed to ``samples_fn``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        positive = ("max_updates", "rollout_batch_size", "mini_batch_size", "ppo_epochs", "forward_batch_size", "adam_epsilon",
                    "max_new_tokens", "temperature", "reward_norm_batches", "kl_target", "kl_horizon", "clip_range",
                    "clip_range_value")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        step_rows = self.mini_batch_size * self.gradient_accumulation_steps
        if self.rollout_batch_size % step_rows:
            raise ValueError(
                f"rollout_batch_size ({self.rollout_batch_size}) must be divisible by mini_batch_size × "
                f"gradient_accumulation_steps ({self.mini_batch_size} × {self.gradient_accumulation_steps} = {step_rows})"
            )
        if self.max_new_tokens >= self.max_length:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) must be < max_length ({self.max_length}) to leave room for a prompt")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={self.gamma}, lam={self.lam}")
        if self.kl_estimator not in get_args(KLEstimator):
            raise ValueError(f"kl_estimator {self.kl_estimator!r} is not one of {sorted(get_args(KLEstimator))}")
        if self.kl_coef < 0 or (self.kl_control == "adaptive" and self.kl_coef == 0):
            raise ValueError(
                f"kl_coef must be >= 0 (> 0 with kl_control='adaptive'), got {self.kl_coef} with kl_control={self.kl_control!r}")
        if self.missing_eos_penalty is not None and not math.isfinite(self.missing_eos_penalty):
            raise ValueError(f"missing_eos_penalty must be a finite number or None, got {self.missing_eos_penalty}")
        if self.missing_eos_mode not in ("subtract", "replace"):
            raise ValueError(f"missing_eos_mode must be 'subtract' or 'replace', got {self.missing_eos_mode!r}")
        if not (math.isfinite(self.reward_model_weight) and math.isfinite(self.reward_fn_weight)):
            raise ValueError(f"reward weights must be finite, got reward_model_weight={self.reward_model_weight}, "
                             f"reward_fn_weight={self.reward_fn_weight}")
        if self.n_eval_samples < 0:
            raise ValueError(f"n_eval_samples must be >= 0, got {self.n_eval_samples}")
