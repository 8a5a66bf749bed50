"""The typed configs of the ``Trainer``-based trainers (SFT, reward model, DPO) and the fields every trainer shares.

Plain dataclasses without torch or transformers, so that checking ``params.yaml`` (``tasks.preflight``, run by
``rlhf run`` before anything starts) does not import them; the trainer modules re-export their config from here.
The names a config accepts for a torch-side registry are listed here too, and ``tests/test_losses.py`` checks
that they are the registry's keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rlhf_core.models.lora import LoraSettings

METHODS = ("dpo", "simpo", "orpo", "kto")
"""The offline objectives of the ``dpo`` trainer (``rlhf_core.trainers.offline_methods``)."""
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
"""``DPOConfig.loss_type``'s names: the keys of ``rlhf_core.losses.DPO_LOSSES``."""


@dataclass
class BaseTrainConfig:
    """Fields every trainer has, PPO's included: output, seed, optimiser, schedule, logging, checkpoints, precision.

    A trainer's config inherits them (so one ``params.yaml`` key means the same everywhere) and adds
    its own; a trainer whose defaults differ re-states only the default. "Steps" are optimizer steps
    for the ``Trainer``-based trainers and updates for PPO.
    """

    output_dir: str = "outputs/run"
    """Where checkpoints go; the final model is saved by the caller."""
    seed: int = 0
    learning_rate: float = 5e-4
    gradient_accumulation_steps: int = 1
    """Passes per optimizer step."""
    warmup_ratio: float = 0.05
    """Share of the training steps with linear warm-up."""
    weight_decay: float = 0.0
    lr_scheduler_type: str = "linear"
    """``transformers.get_scheduler`` name."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm at each optimizer step; ``None``: no clipping."""
    logging_steps: int = 10
    eval_steps: int = 50
    """Evaluate on the held-out split every ``eval_steps`` steps (and at the end)."""
    save_steps: int = 50
    """Write a checkpoint every ``save_steps`` steps; a restarted run resumes from the latest."""
    save_total_limit: int | None = 2
    """Keep at most this many checkpoints (oldest deleted); ``None`` keeps all."""
    max_skipped_steps: int = 0
    """Optimizer steps with a NaN/inf gradient that are skipped (weights and optimizer state untouched) before
    training stops with a divergence error (``rlhf_core.trainers.divergence``); 0: stop at the first."""
    resume: bool = True
    """Resume from the latest checkpoint in ``output_dir`` when one exists."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto``: bf16 on a GPU that supports it, else fp32 (CPU runs are fp32)."""
    max_length: int = 64
    """Prompt + completion tokens (see ``rlhf_core.data.tokenize.TruncationConfig``)."""
    progress: bool = True
    """Show progress bars."""
    eval_on_start: bool = False
    """Also evaluate the starting policy (step 0) on a fresh run: the origin of the over-optimisation curves
    (``rlhf_core.overoptimization``) of the policy-training stages, whose default is ``True``."""
    best_metric: str | None = None
    """Output the policy of the evaluation that is best by this held-out metric (a name under ``eval/``, e.g. ``loss``,
    ``rewards/accuracies``, ``objective/scores``, ``overopt/gold_reward``) instead of the last one (``None``)."""
    greater_is_better: bool | None = None
    """Direction of ``best_metric``; ``None``: lower is better for a name ending in ``loss``, higher for anything else."""

    def best_is_greater(self) -> bool:
        """``greater_is_better`` resolved (transformers' rule for ``None``)."""
        if self.greater_is_better is not None:
            return self.greater_is_better
        return not (self.best_metric or "").endswith("loss")

    def __post_init__(self) -> None:
        for name in ("learning_rate", "gradient_accumulation_steps", "logging_steps", "eval_steps", "save_steps", "max_length"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 or None, got {self.save_total_limit}")


@dataclass
class TrainConfig(BaseTrainConfig):
    """The SFT, reward-model and DPO trainers' config (a ``params.yaml`` group each): transformers' ``Trainer``."""

    max_steps: int = 200
    """Optimizer steps; training stops there (epochs are derived, data is cycled)."""
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 64
    max_prompt_length: int | None = None
    """Longer prompts are cut keeping their end; ``None``: prompts are only bounded by ``max_length``."""
    lora: LoraSettings | None = None
    """Train LoRA adapters (peft) instead of all weights; merged into the saved model."""
    padding_free: bool = True
    """Pack each batch's sequences into rows without padding (``rlhf_core.data.packing``), position ids
    restarting per sequence and no attention across sequences: the same losses as padded batches (to float
    rounding), less compute on data of mixed lengths. Where the model cannot keep packed sequences apart
    (``trainers.padding_free``: e.g. Bloom's ALiBi), the trainer says so and pads."""
    # best_metric (BaseTrainConfig): transformers keeps and loads the best evaluated checkpoint, so save_steps must
    # be a multiple of eval_steps; the starting policy's evaluation (eval_on_start) is not a checkpoint, not a candidate.
    extra_args: dict[str, Any] = field(default_factory=dict)
    """Any other ``transformers.TrainingArguments`` field, passed through (e.g. ``torch_compile``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_steps", "per_device_train_batch_size", "per_device_eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.best_metric is not None and self.save_steps % self.eval_steps:
            raise ValueError(f"best_metric needs save_steps ({self.save_steps}) to be a multiple of eval_steps "
                             f"({self.eval_steps}): only evaluated checkpoints can be chosen")
        if self.max_prompt_length is not None and not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(
                f"max_prompt_length must be in (0, max_length={self.max_length}), got {self.max_prompt_length}"
            )


@dataclass
class SFTConfig(TrainConfig):
    """SFT settings (the ``sft`` group of ``params.yaml``); all fields are ``TrainConfig``'s, some defaults differ."""

    learning_rate: float = 2e-3
    max_steps: int = 300
    eval_steps: int = 100
    save_steps: int = 100


@dataclass
class RewardConfig(TrainConfig):
    """Reward-model settings (the ``reward`` group of ``params.yaml``)."""

    learning_rate: float = 1e-3
    max_steps: int = 500
    """About one epoch of the default task: more over-fits the label noise."""
    eval_steps: int = 250
    save_steps: int = 250
    center_rewards_coefficient: float | None = None
    """Adds c·E[(r_c + r_r)²] to keep rewards centred at 0 (Eisenstein et al. 2023); ``None``: off."""


@dataclass
class DPOConfig(TrainConfig):
    """Offline preference optimisation settings (the ``dpo`` group of ``params.yaml``)."""

    learning_rate: float = 2e-3
    max_steps: int = 150
    eval_steps: int = 75
    save_steps: int = 75
    method: str = "dpo"
    """The objective: ``dpo``, ``simpo``, ``orpo`` or ``kto`` (:data:`METHODS`)."""
    beta: float = 0.1
    """β: DPO Eq. 7's strength of the implicit KL constraint; SimPO's reward scale (the paper uses
    2–10); ORPO's weight λ of the odds-ratio term; KTO's β."""
    loss_type: str = "sigmoid"
    """``dpo`` only: one of :data:`DPO_LOSS_TYPES`: sigmoid, ipo, hinge, robust."""
    simpo_gamma: float = 0.5
    """``simpo`` only: the target reward margin γ (TRL's ``simpo_gamma``)."""
    kto_desirable_weight: float = 1.0
    """``kto`` only: w_d, the weight of desirable (chosen) examples."""
    kto_undesirable_weight: float = 1.0
    """``kto`` only: w_u, the weight of undesirable (rejected) examples."""
    label_smoothing: float = 0.0
    """ε: assumed share of flipped labels (conservative / robust DPO)."""
    reference: Literal["precomputed", "live"] = "precomputed"
    rpo_alpha: float = 1.0
    """α of RPO (Pang et al. 2024; TRL's ``rpo_alpha``): adds α·NLL of the chosen completion (per
    token) to the DPO loss, so the chosen likelihood cannot collapse while the margin grows."""
    eval_on_start: bool = True
    """Also evaluate the starting policy (step 0): the origin of the over-optimisation curve."""
    overopt_prompts: int = 128
    """Distinct prompts of the eval split sampled at each evaluation for the over-optimisation curve (proxy, gold,
    KL to the reference: ``rlhf_core.trainers.curve_probe``); 0: no curve. Needs the reward model (the stage loads it)."""
    overopt_max_new_tokens: int = 12
    """Response budget of those samples (prompts are left-truncated to ``max_length`` minus it)."""
    overopt_temperature: float = 1.0
    """Sampling temperature of those samples (and of the log-probs of their KL)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.overopt_prompts < 0:
            raise ValueError(f"overopt_prompts must be >= 0 (0: no over-optimisation curve), got {self.overopt_prompts}")
        if self.overopt_prompts and not 0 < self.overopt_max_new_tokens < self.max_length:
            raise ValueError(f"overopt_max_new_tokens must be in (0, max_length={self.max_length}) to leave room for a "
                             f"prompt, got {self.overopt_max_new_tokens}")
        if self.overopt_temperature <= 0:
            raise ValueError(f"overopt_temperature must be > 0, got {self.overopt_temperature}")
        if self.rpo_alpha < 0:
            raise ValueError(f"rpo_alpha must be >= 0, got {self.rpo_alpha}")
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {list(METHODS)}")
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r} is not one of {sorted(DPO_LOSS_TYPES)}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
