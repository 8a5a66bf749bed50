"""Divergence guard: a non-finite gradient stops training before it reaches the weights.

transformers' ``Trainer`` hides a NaN/inf loss from its logs (``logging_nan_inf_filter``) and
applies the optimizer step anyway, so a diverged run used to "complete" with a NaN model that
later stages trained on. The guard runs right before every optimizer step
(``on_pre_optimizer_step``): a NaN or inf in any gradient (a non-finite loss makes every gradient
non-finite) either skips that step — gradients dropped, so AdamW leaves the weights and its
moments untouched — while fewer than ``max_skipped_steps`` were skipped, or raises
:class:`DivergenceError` naming the step, so the stage fails, no model is written and the last
checkpoint (written before the bad step) is kept.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from rlhf_core.errors import UserFacingError


class DivergenceError(UserFacingError):
    """Training produced a non-finite gradient; the message names the step and what to change."""


def nonfinite_gradients(model: torch.nn.Module) -> list[str]:
    """Names of the parameters whose gradient holds a NaN or an infinity."""
    named = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(g).all() for _, g in named])  # (P,) one sync for all parameters
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok]


class DivergenceGuard(TrainerCallback):
    """Stops (or, up to ``max_skipped_steps`` times, skips) an optimizer step whose gradients are not finite."""

    def __init__(self, max_skipped_steps: int = 0) -> None:
        if max_skipped_steps < 0:
            raise ValueError(f"max_skipped_steps must be >= 0, got {max_skipped_steps}")
        self.max_skipped_steps = max_skipped_steps
        self.skipped: list[int] = []

    def check(self, model: torch.nn.Module, step: int, learning_rate: float, grad_norm: torch.Tensor | None = None) -> bool:
        """Before optimizer step ``step``: ``True`` if it was skipped (gradients dropped); raises past the limit.

        For loops of our own (PPO, GRPO); ``Trainer``-based ones get it through the callback hook. ``grad_norm``:
        the total norm clipping just computed; when finite every gradient is, and no parameter is scanned.
        """
        if grad_norm is not None and bool(torch.isfinite(grad_norm)):
            return False
        bad = nonfinite_gradients(model)
        if not bad:
            return False
        if len(self.skipped) < self.max_skipped_steps:
            self.skipped.append(step)
            model.zero_grad(set_to_none=True)  # AdamW skips parameters without a gradient
            print(f"[rlhf] step {step}: non-finite gradient in {len(bad)} parameters; step skipped "
                  f"({len(self.skipped)}/{self.max_skipped_steps} allowed)")
            return True
        raise DivergenceError(
            f"training diverged at optimizer step {step}: the gradient of {len(bad)} parameters is NaN or infinite "
            f"(first: {bad[0]}); no model was written and checkpoints before step {step} are kept. "
            f"Lower the learning rate (now {learning_rate:g}) or max_grad_norm, then run again"
            + (f" (already skipped steps {self.skipped})" if self.skipped else "")
        )

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.check(model, state.global_step + 1, args.learning_rate)
