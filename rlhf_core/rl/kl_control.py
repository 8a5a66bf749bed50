"""The KL coefficient β of the shaped reward: fixed, or adapted toward a target KL.

Both controllers keep their state in ``state_dict()`` so a resumed PPO run continues with
the β it had reached rather than the initial one.
"""

from __future__ import annotations

from typing import Any, Protocol

ADAPTIVE_KL_CLIP = 0.2
"""Bound on the proportional error e (Ziegler et al. 2019, §2.2)."""


class KLController(Protocol):
    """What the PPO trainer needs from a KL controller."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _load_value(cls: str, state: dict[str, Any]) -> float:
    if "value" not in state:
        raise ValueError(f"{cls}.load_state_dict: missing key 'value' (got keys {sorted(state)})")
    return float(state["value"])


class FixedKLController:
    """A constant β (``update`` is a no-op)."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"FixedKLController: kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Keep β: a fixed controller ignores the observed KL."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = _load_value(type(self).__name__, state)


class AdaptiveKLController:
    """Proportional controller steering the observed KL to ``target`` (Ziegler et al. 2019 §2.2).

    ``e = clip(KL / KL_target − 1, −0.2, 0.2)``, ``β ← β·(1 + e·n_steps / horizon)``:
    β grows while the policy drifts further than the target from the reference and shrinks
    while it stays closer; the clip bounds each update to a factor of ``1 ± 0.2·n_steps/horizon``.

    Args:
        init_kl_coef: β before the first update, > 0.
        target: KL_target (nats per response), > 0.
        horizon: H, in samples; larger means slower adaptation, > 0.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if init_kl_coef <= 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                "AdaptiveKLController: init_kl_coef, target and horizon must be > 0, "
                f"got {init_kl_coef=}, {target=}, {horizon=}"
            )
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move β after observing mean KL ``current_kl`` over ``n_steps`` samples (batch size)."""
        error = min(max(float(current_kl) / self.target - 1.0, -ADAPTIVE_KL_CLIP), ADAPTIVE_KL_CLIP)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        """β only: ``target`` and ``horizon`` are configuration, taken from the run's config."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = _load_value(type(self).__name__, state)
