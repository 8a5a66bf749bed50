"""Where a response's scalar reward comes from: Python reward functions and a reward model, weighed together.

A reward function maps a batch of (prompt, response) strings to one float each (:class:`RewardFn`;
e.g. the synthetic task's gold reward, ``rlhf_core.synthetic.GoldReward``). PPO can use one
instead of, or beside, a learned reward model (trained by ``rlhf_core.trainers.reward_model``);
:class:`CombinedReward` weighs them together:

    s(x, y) = w_RM · r_φ(x, y) + Σ_i w_i · f_i(x, y)

Not to be confused with ``rlhf_core.rl.reward_shaping``, which turns this score and the KL to the
reference into PPO's per-token rewards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

RM_PART = "reward_model"
"""Name of the reward model's part in :meth:`CombinedReward.parts`."""


class RewardFn(Protocol):
    """``fn(prompts, responses) -> rewards``: one float per pair, same order, same length."""

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]: ...


class CombinedReward:
    """Weighted sum of a reward model's scores and Python reward functions.

    ``s = rm_weight · rm_score + Σ_name weights[name] · fns[name](prompts, responses)``.
    With ``rm_weight == 0`` it is itself a :class:`RewardFn`; otherwise callers pass the reward
    model's scores (computed on token ids, which only they hold).

    Args:
        fns: named reward functions (names are used in ``parts`` for logging).
        weights: weight per name; missing names weigh 1.
        rm_weight: weight of the reward model's score; 0 means no reward model.
    """

    def __init__(self, fns: Mapping[str, RewardFn] | None = None, weights: Mapping[str, float] | None = None,
                 rm_weight: float = 0.0) -> None:
        self.fns = dict(fns or {})
        if RM_PART in self.fns:
            raise ValueError(f"CombinedReward: {RM_PART!r} names the reward model's part; rename that function")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.fns))
        if unknown:
            raise ValueError(f"CombinedReward: weights for unknown reward functions {unknown}; functions: {sorted(self.fns)}")
        self.weights = {name: float(weights.get(name, 1.0)) for name in self.fns}
        self.rm_weight = float(rm_weight)
        if not self.fns and self.rm_weight == 0.0:
            raise ValueError("CombinedReward: nothing to combine; give reward functions or a non-zero rm_weight")
        bad = {name: w for name, w in {**self.weights, "rm_weight": self.rm_weight}.items() if not math.isfinite(w)}
        if bad:
            raise ValueError(f"CombinedReward: weights must be finite, got {bad}")

    @property
    def uses_reward_model(self) -> bool:
        return self.rm_weight != 0.0

    def parts(self, prompts: list[str], responses: list[str], rm_scores: Sequence[float] | None = None
              ) -> tuple[list[float], dict[str, list[float]]]:
        """The combined rewards and each unweighted part (:data:`RM_PART` and every function name)."""
        _check_lengths("CombinedReward", prompts, responses)
        parts: dict[str, list[float]] = {}
        if self.uses_reward_model:
            if rm_scores is None or len(rm_scores) != len(prompts):
                got = None if rm_scores is None else len(rm_scores)
                raise ValueError(f"CombinedReward: rm_weight={self.rm_weight} needs {len(prompts)} reward-model scores, got {got}")
            parts[RM_PART] = [float(s) for s in rm_scores]
        for name, fn in self.fns.items():
            values = [float(v) for v in fn(prompts, responses)]
            if len(values) != len(prompts):
                raise ValueError(f"CombinedReward: reward function {name!r} returned {len(values)} values for {len(prompts)} responses")
            parts[name] = values
        total = [0.0] * len(prompts)
        for name, values in parts.items():
            weight = self.rm_weight if name == RM_PART else self.weights[name]
            total = [t + weight * v for t, v in zip(total, values)]
        return total, parts

    def __call__(self, prompts: list[str], responses: list[str], rm_scores: Sequence[float] | None = None) -> list[float]:
        return self.parts(prompts, responses, rm_scores)[0]


def _check_lengths(name: str, prompts: Sequence[str], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{name}: {len(prompts)} prompts but {len(responses)} responses")
