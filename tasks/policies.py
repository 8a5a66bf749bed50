"""Which policies a run trains: each policy stage's ``train`` switch in ``params.yaml`` (``ppo.train``, ...).

Every policy stage stays in ``dvc.yaml`` (one fixed DAG that ``dvc repro`` reproduces); a stage
whose ``train`` is false runs in a second, writes a ``NOT_TRAINED`` note where its model would be
and ``trained: 0`` in its metrics, and ``evaluate``/``promote`` leave it out. The switch is in the
stage's own group, so turning one policy on re-runs that stage and what follows, not the others.
"""

from __future__ import annotations

import base64
from typing import Any

from tasks.params import ParamsError
from tasks.workspace import Workspace, write_json

POLICY_STAGES = ("ppo", "dpo", "grpo")
"""Stages that train a policy from the SFT model, in ``dvc.yaml`` order."""
TRAIN_KEY = "train"
DEFAULT_TRAIN = {"ppo": True, "dpo": True, "grpo": False}
"""``<stage>.train`` when the key is absent."""
MARKER = "NOT_TRAINED"
BLANK_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8/5+hHgAHggJ/PchI7wAAAABJRU5ErkJggg=="
"""A 1×1 PNG: the over-optimisation plot ``dvc.yaml`` declares, for a policy that is not trained."""


def selected(params: dict[str, Any], stage: str) -> bool:
    """``<stage>.train`` (checked to be a boolean)."""
    value = (params.get(stage) or {}).get(TRAIN_KEY, DEFAULT_TRAIN[stage])
    if not isinstance(value, bool):
        raise ParamsError(f"params.yaml: {stage}.{TRAIN_KEY} must be true or false, got {value!r}")
    return value


def without_switch(params: dict[str, Any], stage: str) -> dict[str, Any]:
    """``params`` without ``<stage>.train``, for building the stage's trainer config."""
    return {**params, stage: {k: v for k, v in (params.get(stage) or {}).items() if k != TRAIN_KEY}}


def is_trained(ws: Workspace, stage: str) -> bool:
    """``models/<stage>`` holds a model (not the not-trained note)."""
    folder = ws.model(stage)
    return folder.is_dir() and not (folder / MARKER).exists() and any(folder.iterdir())


def trained_policies(ws: Workspace) -> list[str]:
    """The policy stages whose model this workspace holds, in stage order."""
    return [p for p in POLICY_STAGES if is_trained(ws, p)]


def write_not_selected(ws: Workspace, stage: str) -> dict[str, Any]:
    """The outputs ``dvc.yaml`` declares for a policy stage switched off.

    A ``NOT_TRAINED`` note where the model and reports would be, header-only curves, a blank over-optimisation plot,
    ``trained: 0``.
    """
    import shutil

    note = f"{stage}.{TRAIN_KEY} is false in params.yaml: this policy is not trained (set it to true to train it).\n"
    for folder in (ws.model(stage), ws.reports(stage), ws.plots(stage)):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    for folder in (ws.model(stage), ws.reports(stage)):
        (folder / MARKER).write_text(note)
    for curve in ("train.csv", "eval.csv", "overoptimization.csv"):
        (ws.plots(stage) / curve).write_text("step\n")
    (ws.plots(stage) / "overoptimization.png").write_bytes(base64.b64decode(BLANK_PNG))
    metrics = {"trained": 0}
    write_json(ws.metrics(stage), metrics)
    print(f"[rlhf] {note.strip()}")
    return metrics
