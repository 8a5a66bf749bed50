"""Checkpoints and resume through Accelerate (detail 15).

``Accelerator.save_state`` writes the policy and value weights, the optimizer, the scheduler, the
RNG states of every process and every object registered with ``register_for_checkpointing`` — here
:class:`PPOState`: the update counter, the KL controller and the reward normalisation. With
``ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=save_total_limit)`` Accelerate
names the folders ``<output_dir>/checkpoints/checkpoint_<n>`` and deletes the oldest beyond the
limit; ``n`` is set to the update counter before each save, so a folder says which update it holds.
``Accelerator.load_state()`` restores the newest.

Accelerate writes a checkpoint in place, and the registered state comes last
(``custom_checkpoint_0.pkl``): a folder without it was cut short by a crash and is removed
before resuming, so that ``load_state`` does not pick it.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from rlhf_core.rl import KLController
from rlhf_core.trainers.ppo.config import PPOConfig
from rlhf_core.trainers.ppo.rollout import RewardNorm

CHECKPOINTS = "checkpoints"
"""Accelerate's folder of automatically named checkpoints, under ``project_dir`` (= ``output_dir``)."""
STATE_FILE = "custom_checkpoint_0.pkl"
"""Accelerate's file for the first registered object (:class:`PPOState`), the last one a save writes."""
_NUMBER = re.compile(r"^checkpoint_(\d+)$")


@dataclass
class PPOState:
    """What PPO adds to Accelerate's checkpoint; registered with ``accelerator.register_for_checkpointing``."""

    kl_ctl: KLController
    reward_norm: RewardNorm
    update: int = 0
    """Updates done; prompt batches are a pure function of (seed, update), so this is all the data position."""

    def state_dict(self) -> dict[str, Any]:
        return {"update": self.update, "kl_controller": self.kl_ctl.state_dict(), "reward_norm": asdict(self.reward_norm)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.update = int(state["update"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.reward_norm = RewardNorm(**state["reward_norm"])


def project_configuration(cfg: PPOConfig) -> ProjectConfiguration:
    """Accelerate's checkpoint naming and rotation for ``cfg.output_dir``."""
    return ProjectConfiguration(project_dir=cfg.output_dir, automatic_checkpoint_naming=True, total_limit=cfg.save_total_limit)


def _folders(output_dir: str | Path) -> list[Path]:
    """``checkpoint_<n>`` folders, oldest first (the order Accelerate sorts them in)."""
    root = Path(output_dir) / CHECKPOINTS
    found = [(int(m.group(1)), p) for p in root.glob("checkpoint_*") if (m := _NUMBER.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def saved_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    return [p for p in _folders(output_dir) if (p / STATE_FILE).is_file()]


def save_checkpoint(accelerator: Accelerator, state: PPOState) -> Path:
    """``checkpoints/checkpoint_<update>``; Accelerate deletes the oldest beyond ``total_limit`` first."""
    folder = Path(accelerator.project_dir) / CHECKPOINTS / f"checkpoint_{state.update}"
    if accelerator.is_main_process and folder.exists():  # left by an earlier run that did not resume (resume=False)
        shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    accelerator.project_configuration.iteration = state.update  # names the folder after the update
    accelerator.save_state()
    accelerator.wait_for_everyone()  # every process's RNG file is in before anyone goes on
    return folder


def resume_from_latest(accelerator: Accelerator) -> Path | None:
    """Restore the newest complete checkpoint (weights, optimizer, scheduler, RNG, :class:`PPOState`); ``None``: none."""
    output_dir = accelerator.project_dir
    if accelerator.is_main_process:
        for partial in (p for p in _folders(output_dir) if not (p / STATE_FILE).is_file()):
            shutil.rmtree(partial)  # a save that a crash cut short
    accelerator.wait_for_everyone()
    complete = saved_checkpoints(output_dir)
    if not complete:
        return None
    accelerator.load_state()  # Accelerate picks the newest checkpoint_<n>
    return complete[-1]
