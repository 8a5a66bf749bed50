"""The alignment flow: Prefect runs DVC, one Prefect task per ``dvc.yaml`` stage.

Parameter overrides go into ``params.yaml`` first (as ``dvc exp run -S``); then each stage runs
as ``dvc repro -s <stage>`` in the workspace, so unchanged stages are skipped by DVC and
``dvc.lock`` always describes what ran. The flow owns the parent MLflow run, pushes the
outputs to the DVC remote, and logs the summary on the parent run. Retries go on I/O tasks
only (push, summary); training stages resume from their own checkpoints when re-run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from tasks import dvc_ops
from tasks.params import apply_overrides, load_params
from tasks.parent_run import close_parent_run, open_parent_run
from tasks.tracking import PARENT_RUN_ENV, git_info

STAGE_TIMEOUT_S = 6 * 3600


@task(name="apply-overrides")
def apply_overrides_task(root: str, overrides: list[str]) -> dict[str, Any]:
    changed = apply_overrides(Path(root) / "params.yaml", overrides)
    for key, (old, new) in changed.items():
        get_run_logger().info("params.yaml: %s = %r (was %r)", key, new, old)
    return {k: v[1] for k, v in changed.items()}


@task(name="stage", task_run_name="{stage}", timeout_seconds=STAGE_TIMEOUT_S)
def stage_task(root: str, stage: str, parent_run_id: str) -> dict[str, Any]:
    logger = get_run_logger()
    outcome = dvc_ops.repro_stage(Path(root), stage, env={PARENT_RUN_ENV: parent_run_id}, echo=logger.info)
    logger.info("stage %s %s in %.1fs", stage, "ran" if outcome.ran else "was up to date", outcome.seconds)
    return {"stage": stage, "ran": outcome.ran, "seconds": round(outcome.seconds, 1)}


@task(name="dvc-push", retries=3, retry_delay_seconds=10)
def push_task(root: str, remote: str | None) -> str:
    return dvc_ops.push(Path(root), remote)


@task(name="mlflow-summary", retries=3, retry_delay_seconds=5)
def summary_task(root: str, tracking: dict[str, Any] | None, parent_run_id: str, status: str, tags: dict[str, str]) -> str:
    return close_parent_run(Path(root), tracking, parent_run_id, status=status, summary_tags=tags)


@flow(name="rlhf-alignment", log_prints=True)
def alignment_flow(
    workspace: str = ".",
    overrides: list[str] | None = None,
    push: bool = True,
    remote: str | None = None,
    stages: list[str] | None = None,
) -> dict[str, Any]:
    """Run the pipeline in ``workspace`` (a git + DVC repo of this project).

    ``overrides``: ``KEY=VALUE`` written into params.yaml first (``dpo.beta=0.2``);
    ``stages``: run only these (default: every stage of dvc.yaml, in order);
    ``push``: push outputs to the DVC remote (``remote`` or the default one) at the end.
    """
    root = str(Path(workspace).resolve())
    changed = apply_overrides_task(root, overrides or [])
    params = load_params(Path(root) / "params.yaml")
    tracking = params.get("tracking")
    git = git_info(Path(root))
    flow_run_id = str(flow_run.get_id() or "")
    parent = open_parent_run(
        Path(root), tracking, run_name=f"pipeline-{flow_run.get_name() or 'local'}",
        tags={"prefect.flow_run_id": flow_run_id, "git.commit": str(git.get("commit")), "git.dirty": str(git.get("dirty"))},
    )
    order = [s for s in dvc_ops.stage_order(Path(root)) if not stages or s in stages]
    outcomes: list[dict[str, Any]] = []
    try:
        for stage in order:
            outcomes.append(stage_task(root, stage, parent))
    except BaseException:
        summary_task(root, tracking, parent, "FAILED", {"prefect.flow_run_id": flow_run_id})
        raise
    pushed = push_task(root, remote) if push else "skipped"
    uri = summary_task(root, tracking, parent, "FINISHED", {"prefect.flow_run_id": flow_run_id, "overrides": str(changed)})
    return {"parent_run_id": parent, "tracking_uri": uri, "stages": outcomes, "push": pushed, "workspace": root}
