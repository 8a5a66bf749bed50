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
the parent run. Retries go on the push only (MLflow calls retry by themselves, bounded by
``tracking.timeout_s``/``max_retries``); training stages resume from their own checkpoints when re-run.

Before anything runs, the first task checks the settings and what the run will reach (the tracking
server, the DVC remote when pushing, the data sources: ``tasks.preflight``), as ``rlhf run`` does
before it starts the flow. When things go wrong, the run ends with one
:class:`~rlhf_core.errors.UserFacingError` and honest records: a failed stage or an interrupt ends
the parent run FAILED or KILLED (an interrupt stops the stage's process group first); a tracking
server that stops answering ends the run after the stage it happened in (that stage keeps its
outputs; ``rlhf sync`` sends what was not logged); a failed push leaves the parent run FINISHED with
its summary, tagged ``dvc.push=failed``. Before it starts, a run closes the runs that a killed run
left RUNNING (``tasks.tracking.lifecycle``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from tasks import dvc_ops
from tasks.isolation import isolated_checkout
from tasks.params import apply_overrides, load_params
from tasks.parent_run import close_parent_run, close_stale_runs_of, compute_share, open_parent_run
from tasks.stage_host import hosted
from tasks.tracking.client import PARENT_RUN_ENV, TRACKING_URI_ENV, resolve_tracking_uri
from tasks.tracking.gitinfo import git_info
from tasks.tracking.outage import TrackingUnavailable, pending_dir, pending_journals
from tasks.workspace_lock import workspace_run_lock

STAGE_TIMEOUT_S = 6 * 3600


def read_metrics(root: Path) -> dict[str, Any]:
    """{stage: metrics/<stage>.json} of a finished run (what the printed summary shows)."""
    import json

    return {p.stem: json.loads(p.read_text()) for p in sorted((root / "metrics").glob("*.json"))}


def run_tracking(params: dict[str, Any], workspace: Path) -> dict[str, Any]:
    """The ``tracking`` settings of a run whose parameters are ``params`` (``root``'s params.yaml with the overrides
    applied), the URI resolved against ``workspace``: every run of a workspace tracks into the workspace's store, also
    from an isolated checkout. The flow's service check, its parent run and its stages all use these."""
    tracking = params.get("tracking") or {}
    return {**tracking, "uri": resolve_tracking_uri(tracking.get("uri"), workspace)}


@task(name="apply-overrides")
def apply_overrides_task(root: str, overrides: list[str], push: bool = True, remote: str | None = None,
                         workspace: str | None = None) -> dict[str, Any]:
    """The preflight (``tasks.preflight``: the settings, then the tracking server of :func:`run_tracking`, the DVC
    remote when pushing and the data sources) of the parameters with the overrides, then the overrides written into
    ``root``'s params.yaml; nothing is written unless all pass. ``workspace``: the run's workspace (default ``root``)."""
    from tasks.preflight import check_params, check_services

    def check(params: dict[str, Any]) -> None:
        check_params(params)
        check_services(Path(root), params, push=push, remote=remote,
                       tracking_uri=run_tracking(params, Path(workspace or root))["uri"])

    changed = apply_overrides(Path(root) / "params.yaml", overrides, check=check)
    for key, (old, new) in changed.items():
        get_run_logger().info("params.yaml: %s = %r (was %r)", key, new, old)
    return {k: v[1] for k, v in changed.items()}


@task(name="stage", task_run_name="{stage}", timeout_seconds=STAGE_TIMEOUT_S)
def stage_task(root: str, stage: str, parent_run_id: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    logger = get_run_logger()
    outcome = dvc_ops.repro_stage(Path(root), stage, env={**(env or {}), PARENT_RUN_ENV: parent_run_id}, echo=logger.info)
    logger.info("stage %s %s in %.1fs", stage, "ran" if outcome.ran else "was up to date", outcome.seconds)
    return {"stage": stage, "ran": outcome.ran, "seconds": round(outcome.seconds, 1)}


@task(name="dvc-push", retries=1, retry_delay_seconds=5)
def push_task(root: str, remote: str | None) -> str:
    return dvc_ops.push(Path(root), remote)


@task(name="mlflow-summary")
def summary_task(root: str, tracking: dict[str, Any] | None, parent_run_id: str, status: str, tags: dict[str, str],
                 stages: list[dict[str, Any]] | None = None, journal_dir: str | None = None,
                 extra_metrics: dict[str, float] | None = None) -> str:
    uri, _ = close_parent_run(Path(root), tracking, parent_run_id, status=status, summary_tags=tags, stages=stages,
                              journal_dir=Path(journal_dir) if journal_dir else None, extra_metrics=extra_metrics)
    return uri


@task(name="close-stale-runs")
def close_stale_task(root: str, tracking: dict[str, Any] | None, workspace: str) -> list[str]:
    """Runs a killed run left RUNNING: KILLED in MLflow, their Prefect flow runs crashed; returns their ids."""
    closed = close_stale_runs_of(Path(root), tracking, Path(workspace))
    for run in closed:
        mark_flow_run_crashed(run.data.tags.get("prefect.flow_run_id", ""), f"its process ({run.data.tags.get('rlhf.pid')}) "
                              "was killed; closed by a later run")
    if closed:
        get_run_logger().warning("closed %d run(s) left RUNNING by a killed run: %s", len(closed),
                                 ", ".join(r.info.run_id for r in closed))
    return [r.info.run_id for r in closed]


def mark_flow_run_crashed(flow_run_id: str, message: str) -> None:
    """Set a Prefect flow run still PENDING/RUNNING to Crashed (one of another server is left alone)."""
    from uuid import UUID

    from prefect import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    if not flow_run_id:
        return
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(UUID(flow_run_id))
        except ObjectNotFound:
            return
        if run.state is not None and not run.state.is_final():
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)


def tracking_stopped(journals: list, stage: str | None) -> TrackingUnavailable:
    """The one message of a run whose tracking server stopped answering (``stage``: the stage it happened in)."""
    meta = journals[0].meta
    where = (f"during stage '{stage}': '{stage}' finished, its outputs are kept and dvc.lock records them; the stages after "
             "it did not run" if stage else "as the run ended: every stage finished")
    return TrackingUnavailable(
        f"the MLflow tracking server {meta['uri']} stopped answering ({meta['reason']}) {where}. What could not be logged "
        f"waits in {journals[0].path.parent}: once the server is back, `rlhf sync` sends it (the runs then end as they "
        "would have), and `rlhf run` goes on from where this run stopped.")


@flow(name="rlhf-alignment", log_prints=True)
def alignment_flow(
    workspace: str = ".",
    overrides: list[str] | None = None,
    push: bool = True,
    remote: str | None = None,
    stages: list[str] | None = None,
    ref: str | None = None,
    started_at: float | None = None,
) -> dict[str, Any]:
    """Run the pipeline in ``workspace`` (a git + DVC repo of this project).

    ``overrides``: ``KEY=VALUE`` applied to params.yaml first (``dpo.beta=0.2``);
    ``stages``: run only these (default: every stage of dvc.yaml, in order);
    ``push``: push outputs to the DVC remote (``remote`` or the default one) at the end;
    ``ref``: run isolated, from this git ref's committed state (deployments), instead of in the workspace;
    ``started_at``: when the run began (``time.time()``; ``rlhf run``: the command's start), for its compute share.
    """
    started_at = started_at or time.time()
    workspace_root = Path(workspace).resolve()
    name = flow_run.get_name() or "local"
    # Workspace mode: one run at a time in the folder (rlhf run holds the lock already; a flow started otherwise takes it).
    checkout = (isolated_checkout(workspace_root, ref, name, echo=get_run_logger().info) if ref
                else workspace_run_lock(workspace_root, f"flow run {name}"))
    with checkout as isolated:
        root = str(isolated.root if isolated else workspace_root)
        changed = apply_overrides_task(root, overrides or [], push, remote, str(workspace_root))
        # After the overrides: `--set tracking.uri=...` / `tracking.experiment=...` reach the parent run and the stages alike.
        tracking = run_tracking(load_params(Path(root) / "params.yaml"), workspace_root)
        env = {**isolated.env, TRACKING_URI_ENV: tracking["uri"]} if isolated else {}
        git = git_info(Path(root))
        flow_run_id = str(flow_run.get_id() or "")
        tags = {"prefect.flow_run_id": flow_run_id, "git.commit": str(git.get("commit")), "git.dirty": str(git.get("dirty")),
                "run.mode": f"isolated from {ref}" if ref else "workspace"}
        journals = pending_dir(workspace_root)  # the workspace's, also for an isolated checkout (its stages' $RLHF_STATE_DIR)
        close_stale_task(root, tracking, str(workspace_root))
        parent = open_parent_run(Path(root), tracking, run_name=f"pipeline-{name}", tags=tags)
        order = [s for s in dvc_ops.stage_order(Path(root)) if not stages or s in stages]
        outcomes: list[dict[str, Any]] = []
        try:
            with hosted({**os.environ, **env}) as host:  # one warm process imports the libraries for every stage
                for stage in order:
                    outcomes.append(stage_task(root, stage, parent, {**env, **host}))
                    if kept := pending_journals(workspace_root, parent_run_id=parent):
                        raise tracking_stopped(kept, stage)
        except BaseException as err:  # close the parent directly: no Prefect task after an interrupt
            try:
                _, kept = close_parent_run(Path(root), tracking, parent, stages=outcomes, journal_dir=journals,
                                           status="KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED",
                                           summary_tags={"prefect.flow_run_id": flow_run_id})
                if kept is not None and not isinstance(err, TrackingUnavailable):
                    get_run_logger().warning("the MLflow tracking server does not answer either: the parent run's end waits in "
                                             "%s for `rlhf sync`", kept.path)
            except Exception as close_err:  # never hide why the run stopped
                get_run_logger().warning("could not close the parent run %s: %s", parent, close_err)
            raise
        try:
            pushed = push_task(root, remote) if push else "skipped"
        except dvc_ops.PushFailed as err:  # the run is complete: record it, then fail on the push alone
            pushed, push_failed = "failed", err
        else:
            push_failed = None
        share = compute_share(outcomes, read_metrics(Path(root)), time.time() - started_at)
        uri = summary_task(root, tracking, parent, "FINISHED", {"prefect.flow_run_id": flow_run_id, "overrides": str(changed),
                                                                "dvc.push": "failed" if push_failed else "done" if push else "skipped"},
                           outcomes, str(journals), share)
        if kept := pending_journals(workspace_root, parent_run_id=parent):
            raise tracking_stopped(kept, None)
        if push_failed is not None:
            raise dvc_ops.PushFailed(f"{push_failed} The pipeline run itself is complete: MLflow parent run {parent} is "
                                     "FINISHED with its summary (tagged dvc.push=failed).")
        metrics = read_metrics(Path(root))  # an isolated checkout is gone after the block
    return {"metrics": metrics, "parent_run_id": parent, "tracking_uri": uri, "stages": outcomes, "push": pushed, "workspace": root,
            "isolated": bool(ref), "overrides": changed, "compute": share}
