"""The alignment flow: Prefect runs DVC, one Prefect task per ``dvc.yaml`` stage.

Two ways to run, by ``ref``:

- ``ref=None`` (``rlhf run`` in a user's workspace): DVC's workspace model. Overrides are written
  into the workspace's ``params.yaml`` (as ``dvc exp run -S``) and the stages run there.
- ``ref="main"`` (the deployments): an isolated run. The committed state of the ref is checked
  out afresh for this run (``tasks.isolation``), the overrides apply to that checkout only, and
  the DVC cache and run-cache are shared, so unchanged stages are restored, not recomputed, and
  two runs at once never touch the same files.

Each stage runs as ``dvc repro -s <stage>``, so unchanged stages are skipped by DVC and
``dvc.lock`` always describes what ran. ``ingest`` snapshots the data sources first (new data
re-runs what it touches) and ``promote`` moves ``@champion`` only when the new policy wins. The
flow owns the parent MLflow run, pushes the outputs to the DVC remote, and logs the summary on
the parent run. Retries go on I/O tasks only (push, summary); training stages resume from their
own checkpoints when re-run.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from tasks import dvc_ops
from tasks.isolation import isolated_checkout
from tasks.params import apply_overrides, load_params
from tasks.parent_run import close_parent_run, open_parent_run
from tasks.tracking.client import PARENT_RUN_ENV, resolve_tracking_uri
from tasks.tracking.gitinfo import git_info

STAGE_TIMEOUT_S = 6 * 3600


def read_metrics(root: Path) -> dict[str, Any]:
    """{stage: metrics/<stage>.json} of a finished run (what the printed summary shows)."""
    import json

    return {p.stem: json.loads(p.read_text()) for p in sorted((root / "metrics").glob("*.json"))}


@task(name="apply-overrides")
def apply_overrides_task(root: str, overrides: list[str]) -> dict[str, Any]:
    from tasks.preflight import check_params

    changed = apply_overrides(Path(root) / "params.yaml", overrides, check=check_params)  # nothing written unless all pass
    for key, (old, new) in changed.items():
        get_run_logger().info("params.yaml: %s = %r (was %r)", key, new, old)
    return {k: v[1] for k, v in changed.items()}


@task(name="stage", task_run_name="{stage}", timeout_seconds=STAGE_TIMEOUT_S)
def stage_task(root: str, stage: str, parent_run_id: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    logger = get_run_logger()
    outcome = dvc_ops.repro_stage(Path(root), stage, env={**(env or {}), PARENT_RUN_ENV: parent_run_id}, echo=logger.info)
    logger.info("stage %s %s in %.1fs", stage, "ran" if outcome.ran else "was up to date", outcome.seconds)
    return {"stage": stage, "ran": outcome.ran, "seconds": round(outcome.seconds, 1)}


@task(name="dvc-push", retries=3, retry_delay_seconds=10)
def push_task(root: str, remote: str | None) -> str:
    return dvc_ops.push(Path(root), remote)


@task(name="mlflow-summary", retries=3, retry_delay_seconds=5)
def summary_task(root: str, tracking: dict[str, Any] | None, parent_run_id: str, status: str, tags: dict[str, str],
                 stages: list[dict[str, Any]] | None = None) -> str:
    return close_parent_run(Path(root), tracking, parent_run_id, status=status, summary_tags=tags, stages=stages)


@flow(name="rlhf-alignment", log_prints=True)
def alignment_flow(
    workspace: str = ".",
    overrides: list[str] | None = None,
    push: bool = True,
    remote: str | None = None,
    stages: list[str] | None = None,
    ref: str | None = None,
) -> dict[str, Any]:
    """Run the pipeline in ``workspace`` (a git + DVC repo of this project).

    ``overrides``: ``KEY=VALUE`` applied to params.yaml first (``dpo.beta=0.2``);
    ``stages``: run only these (default: every stage of dvc.yaml, in order);
    ``push``: push outputs to the DVC remote (``remote`` or the default one) at the end;
    ``ref``: run isolated, from this git ref's committed state (deployments), instead of in the workspace.
    """
    workspace_root = Path(workspace).resolve()
    name = flow_run.get_name() or "local"
    tracking = load_params(workspace_root / "params.yaml").get("tracking") or {}
    # Every run of a workspace tracks into the workspace's store, also from an isolated checkout.
    tracking = {**tracking, "uri": resolve_tracking_uri(tracking.get("uri"), workspace_root)}
    checkout = (isolated_checkout(workspace_root, ref, name, tracking_uri=tracking["uri"], echo=get_run_logger().info)
                if ref else nullcontext(None))
    with checkout as isolated:
        root = str(isolated.root if isolated else workspace_root)
        env = isolated.env if isolated else {}
        changed = apply_overrides_task(root, overrides or [])
        git = git_info(Path(root))
        flow_run_id = str(flow_run.get_id() or "")
        tags = {"prefect.flow_run_id": flow_run_id, "git.commit": str(git.get("commit")), "git.dirty": str(git.get("dirty")),
                "run.mode": f"isolated from {ref}" if ref else "workspace"}
        parent = open_parent_run(Path(root), tracking, run_name=f"pipeline-{name}", tags=tags)
        order = [s for s in dvc_ops.stage_order(Path(root)) if not stages or s in stages]
        outcomes: list[dict[str, Any]] = []
        try:
            for stage in order:
                outcomes.append(stage_task(root, stage, parent, env))
        except BaseException:
            summary_task(root, tracking, parent, "FAILED", {"prefect.flow_run_id": flow_run_id}, outcomes)
            raise
        pushed = push_task(root, remote) if push else "skipped"
        uri = summary_task(root, tracking, parent, "FINISHED", {"prefect.flow_run_id": flow_run_id, "overrides": str(changed)},
                           outcomes)
        metrics = read_metrics(Path(root))  # an isolated checkout is gone after the block
    return {"metrics": metrics, "parent_run_id": parent, "tracking_uri": uri, "stages": outcomes, "push": pushed, "workspace": root,
            "isolated": bool(ref), "overrides": changed}
