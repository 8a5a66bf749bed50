"""Which policies a run trains: ``pipeline.policies`` in ``params.yaml``.

Every policy stage stays in ``dvc.yaml`` (one fixed DAG that ``dvc repro`` reproduces); a stage
whose policy is not selected runs in a second, writes a ``NOT_TRAINED`` marker where its model
would be and ``trained: 0`` in its metrics, and ``evaluate``/``promote`` leave it out. Selecting it
later changes ``pipeline.policies``, which DVC sees, so only that stage and what follows re-run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tasks.params import typed
from tasks.workspace import Workspace, write_json

POLICY_STAGES = ("ppo", "dpo", "grpo")
"""Stages that train a policy from the SFT model, in ``dvc.yaml`` order."""
DEFAULT_POLICIES = ["ppo", "dpo"]
MARKER = "NOT_TRAINED"


@dataclass
class PipelineConfig:
    """The ``pipeline`` group of ``params.yaml``: what a run trains."""

    policies: list[str] = field(default_factory=lambda: list(DEFAULT_POLICIES))
    """Policy stages to train from the SFT model, any of :data:`POLICY_STAGES`; the others are skipped."""

    def __post_init__(self) -> None:
        if not self.policies:
            raise ValueError(f"policies must name at least one of {list(POLICY_STAGES)}")
        unknown = [p for p in self.policies if p not in POLICY_STAGES]
        if unknown:
            raise ValueError(f"policies: unknown {unknown}; choose from {list(POLICY_STAGES)}")


def selected_policies(params: dict[str, Any]) -> list[str]:
    """``pipeline.policies``, checked, in stage order (:data:`DEFAULT_POLICIES` without a ``pipeline`` group)."""
    if "pipeline" not in params:
        return list(DEFAULT_POLICIES)
    chosen = typed(params, "pipeline", PipelineConfig).policies
    return [p for p in POLICY_STAGES if p in chosen]


def trained_policies(params: dict[str, Any], ws: Workspace) -> list[str]:
    """The selected policy stages whose model this workspace holds, in stage order."""
    return [p for p in selected_policies(params) if is_trained(ws, p)]


def is_trained(ws: Workspace, stage: str) -> bool:
    """``models/<stage>`` holds a model (not the not-selected marker)."""
    folder = ws.model(stage)
    return folder.is_dir() and not (folder / MARKER).exists() and any(folder.iterdir())


def write_not_selected(ws: Workspace, stage: str) -> dict[str, Any]:
    """The outputs ``dvc.yaml`` declares for a policy stage that ``pipeline.policies`` leaves out.

    A ``NOT_TRAINED`` note where the model and reports would be, header-only curves, ``trained: 0``.
    """
    import shutil

    note = f"{stage} is not in pipeline.policies: not trained in this run (add it there to train it).\n"
    for folder in (ws.model(stage), ws.reports(stage), ws.plots(stage)):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    for folder in (ws.model(stage), ws.reports(stage)):
        (folder / MARKER).write_text(note)
    for curve in ("train.csv", "eval.csv"):
        (ws.plots(stage) / curve).write_text("step\n")
    metrics = {"trained": 0}
    write_json(ws.metrics(stage), metrics)
    print(f"[rlhf] {note.strip()}")
    return metrics
