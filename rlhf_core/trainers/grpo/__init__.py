"""GRPO (Shao et al. 2024, DeepSeekMath §4) and RLOO (Ahmadian et al. 2024): online RL without a critic.

For each prompt, ``k`` responses are sampled from the current policy and scored by programs
(reward functions: ``rlhf_core.reward_registry``) and/or a reward model. The baseline is the
group itself: GRPO's advantage is the reward minus its group's mean, divided by a std (group,
batch, or none as Dr. GRPO); RLOO's is the reward minus the mean of the other ``k − 1``. Every
token of a response carries its response's advantage in the clipped surrogate
(``rlhf_core.rl.grpo_loss``, TRL 1.16's numerics), with an optional k3 KL to the frozen reference.

- ``config``: :class:`GRPOConfig`;
- ``trainer``: one update and evaluation (:class:`GRPOTrainer`; the loop and checkpoints: ``rlhf_core.trainers.online``);
- ``train``: :func:`train_grpo`, which builds the models, optimizer and Accelerator and runs the loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlhf_core.lazy_exports import lazy_exports

# Re-exported lazily (PEP 562): ``grpo.config`` is torch-free, so checking ``params.yaml`` (``tasks.preflight``)
# imports GRPOConfig without the trainer's torch and transformers.
_EXPORTS: dict[str, str] = {
    "GRPOConfig": "rlhf_core.trainers.grpo.config",
    "GRPOResult": "rlhf_core.trainers.grpo.train",
    "GRPOTrainer": "rlhf_core.trainers.grpo.trainer",
    "train_grpo": "rlhf_core.trainers.grpo.train",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # also what tests/test_stage_deps.py follows to the modules
    from rlhf_core.trainers.grpo.config import GRPOConfig
    from rlhf_core.trainers.grpo.train import GRPOResult, train_grpo
    from rlhf_core.trainers.grpo.trainer import GRPOTrainer

__getattr__ = lazy_exports(__name__, _EXPORTS)
