"""The parent MLflow run of one pipeline run: opened by the flow, closed with its summary.

Stage processes nest their runs under it through ``$RLHF_PARENT_RUN_ID``. At the end it gets
every ``metrics/*.json`` value (also of stages DVC skipped), ``params.yaml``, ``dvc.lock``,
the git commit and dirty flag, and the Prefect flow-run id (:func:`log_parent_summary`).
Everything goes through a client bound to the project's store (``tasks.tracking.client``); the
closing calls through a :class:`~tasks.tracking.outage.RunSink`, so a server that is down at the
end keeps them (with copies of the files) for ``rlhf sync``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.tracking.client import connect
from tasks.tracking.lifecycle import create_run
from tasks.tracking.outage import RunSink, pending_dir, pending_journals
from tasks.tracking.values import finite_number, flatten_params

if TYPE_CHECKING:
    from mlflow.entities import Run

    from tasks.tracking.outage import Journal

RECORD_DIR = "pipeline"  # artifact folder of a parent run: params.yaml, dvc.lock, metrics/


def open_parent_run(project_dir: Path, tracking: dict[str, Any] | None, *, run_name: str, tags: dict[str, str]) -> str:
    """Create the parent run (left RUNNING for the stage processes), log params.yaml flattened; return its id."""
    from tasks.params import load_params

    store = connect(project_dir, tracking)
    # Every params.yaml value as a dotted param: what `rlhf compare` and the MLflow UI diff.
    return create_run(store, run_name=run_name, tags={"pipeline": "rlhf", **tags},
                      params=flatten_params(load_params(project_dir / "params.yaml")), doing="the pipeline did not start")


def close_stale_runs_of(project_dir: Path, tracking: dict[str, Any] | None, workspace: Path) -> list[Run]:
    """Before a run starts: stop what killed runs of ``workspace`` left running (``tasks.process_groups``), then
    close the runs they left RUNNING (``tasks.tracking.lifecycle``), but those whose calls wait for ``rlhf sync``."""
    from tasks.process_groups import stop_orphans
    from tasks.tracking.lifecycle import close_stale_runs
    from tasks.workspace import state_dir

    stop_orphans(state_dir(workspace))
    waiting = {journal.meta["run_id"] for journal in pending_journals(workspace)}
    return close_stale_runs(connect(project_dir, tracking), skip=waiting)


def run_tags(project_dir: Path, stages: list[dict[str, Any]] | None) -> dict[str, str]:
    """Tags that say what this run used and decided: each data source's identity (``source.*``) and,
    when ``promote`` had nothing new to judge, that the champion stayed (``promotion.*``)."""
    from tasks.sources import source_tags

    tags: dict[str, str] = {}
    ingest = project_dir / "metrics" / "ingest.json"
    if ingest.is_file():
        tags.update(source_tags(json.loads(ingest.read_text()).get("sources", {})))
    if any(s["stage"] == "promote" and not s["ran"] for s in stages or []):
        tags["promotion.decision"] = "unchanged: no new challenger (the policy and its inputs did not change)"
    return tags


def close_parent_run(project_dir: Path, tracking: dict[str, Any] | None, run_id: str, *, status: str,
                     summary_tags: dict[str, str] | None = None, stages: list[dict[str, Any]] | None = None,
                     journal_dir: Path | None = None) -> tuple[str, Journal | None]:
    """Log the summary (metrics, params.yaml, dvc.lock, tags) and end the run.

    Returns the tracking URI and, when the server was down, the journal that keeps the calls
    (in ``journal_dir``, default the project's ``<state>/tracking_pending``) for ``rlhf sync``.
    """
    store = connect(project_dir, tracking)
    sink = RunSink(store.client, run_id, journal_dir=journal_dir or pending_dir(project_dir), name="pipeline", uri=store.uri,
                   parent_run_id=run_id)
    if status == "FINISHED":
        log_parent_summary(
            sink, metrics_dir=project_dir / "metrics", params_file=project_dir / "params.yaml",
            lock_file=project_dir / "dvc.lock", extra_tags={**run_tags(project_dir, stages), **(summary_tags or {})},
        )
    elif summary_tags:
        sink.send("log_batch", tags=[[k, str(v)] for k, v in summary_tags.items()])
    sink.send("set_terminated", status=status)
    return store.uri, sink.journal


def _flatten_metrics(tree: Mapping[str, Any], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, raw in tree.items():
        name = f"{prefix}/{key}"
        if isinstance(raw, Mapping):
            out.update(_flatten_metrics(raw, name))
        elif (value := finite_number(raw)) is not None:
            out[name] = value
    return out


def metrics_dir_values(metrics_dir: Path) -> dict[str, float]:
    """Every finite number in ``metrics_dir/*.json`` as ``<stage>/<key>`` (nested keys joined by ``/``):
    what the parent run logs and what ``rlhf reproduce`` compares."""
    metrics: dict[str, float] = {}
    for path in sorted(metrics_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON: {err}") from err
        if isinstance(data, Mapping):
            metrics.update(_flatten_metrics(data, path.stem))
    return metrics


def log_parent_summary(
    sink: RunSink, *, metrics_dir: Path, params_file: Path, lock_file: Path, extra_tags: Mapping[str, Any],
) -> dict[str, float]:
    """Summarise a pipeline run on its parent run (``sink``'s run).

    Logs every finite number in ``metrics_dir/*.json`` as ``<stage>/<key>`` (nested keys joined
    by ``/``; also for stages DVC skipped), ``params_file`` and ``lock_file`` as artifacts
    (when they exist) and ``extra_tags``. Returns the metrics it logged.
    """
    metrics = metrics_dir_values(Path(metrics_dir))
    timestamp = int(time.time() * 1000)
    sink.send("log_batch", metrics=[[k, v, timestamp, 0] for k, v in metrics.items()],
              tags=[[k, str(v)] for k, v in extra_tags.items()])
    # The run's record, what `rlhf reproduce` rebuilds from: pipeline/{params.yaml,dvc.lock,metrics/*.json}.
    for path in (Path(params_file), Path(lock_file)):
        if path.is_file():
            sink.send("log_artifact", path=str(path), artifact_path=RECORD_DIR)
    for path in sorted(Path(metrics_dir).glob("*.json")):
        sink.send("log_artifact", path=str(path), artifact_path=f"{RECORD_DIR}/metrics")
    return metrics


def download_run_record(project_dir: Path, tracking: dict[str, Any] | None, run_id: str, dest: Path) -> dict[str, Any]:
    """Fetch a parent run's record: commit, params.yaml, dvc.lock, metrics files and logged metric values."""
    store = connect(project_dir, tracking)
    try:
        run = store.client.get_run(run_id)
    except Exception as err:  # MlflowException for an unknown id
        raise ValueError(f"no MLflow run {run_id!r} at {store.uri}: {err}") from err
    try:
        local = Path(store.client.download_artifacts(run_id, RECORD_DIR, str(dest)))
    except Exception as err:
        raise ValueError(f"run {run_id} has no '{RECORD_DIR}/' record: is it a finished pipeline parent run? ({err})") from err
    params, lock = local / "params.yaml", local / "dvc.lock"
    if not params.exists() or not lock.exists():
        raise ValueError(f"run {run_id} has no params.yaml/dvc.lock under '{RECORD_DIR}/': is it a pipeline parent run?")
    return {
        "commit": run.data.tags.get("git.commit", ""),
        "params": params,
        "lock": lock,
        "metrics": sorted((local / "metrics").glob("*.json")),
        "logged_metrics": metrics_dir_values(local / "metrics"),
    }
