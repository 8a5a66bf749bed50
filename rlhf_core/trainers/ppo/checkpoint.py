"""Checkpoints and resume through Accelerate (detail 15): PPO's part of the checkpointed state.

The mechanics (folder naming and rotation, crash-cut saves, restoring the newest) are shared with
GRPO in ``rlhf_core.trainers.online``; PPO adds the KL controller and the reward normalisation to
the registered state, so a resumed run ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from rlhf_core.rl import KLController
from rlhf_core.trainers.online import OnlineState
from rlhf_core.trainers.ppo.rollout import RewardNorm


@dataclass(kw_only=True)
class PPOState(OnlineState):
    """The update counter, curves and samples (:class:`OnlineState`), the KL controller and the reward normalisation."""

    kl_ctl: KLController
    reward_norm: RewardNorm

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "kl_controller": self.kl_ctl.state_dict(), "reward_norm": asdict(self.reward_norm)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.reward_norm = RewardNorm(**state["reward_norm"])
