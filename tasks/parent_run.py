"""The parent MLflow run of one pipeline run: opened by the flow, closed with its summary.

Stage processes nest their runs under it through ``$RLHF_PARENT_RUN_ID``. At the end it gets
every ``metrics/*.json`` value (also of stages DVC skipped), ``params.yaml``, ``dvc.lock``,
the git commit and dirty flag, and the Prefect flow-run id (``tasks.tracking.log_parent_summary``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.tracking import (
    DEFAULT_EXPERIMENT,
    RECORD_DIR,
    flatten_params,
    log_parent_summary,
    metrics_dir_values,
    resolve_tracking_uri,
)


@contextmanager
def tracking_client(project_dir: Path, tracking: dict[str, Any] | None) -> Iterator[tuple[Any, str]]:
    """An ``MlflowClient`` for the project's tracking URI; MLflow's global URI (and the
    ``$MLFLOW_TRACKING_URI`` it sets) is put back afterwards, so one process can serve several workspaces."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri((tracking or {}).get("uri"), project_dir)
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield MlflowClient(uri), uri
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
            mlflow.set_tracking_uri(None)
        else:
            mlflow.set_tracking_uri(saved)


def open_parent_run(project_dir: Path, tracking: dict[str, Any] | None, *, run_name: str, tags: dict[str, str]) -> str:
    """Create the parent run (left RUNNING for the stage processes), log params.yaml flattened; return its id."""
    from mlflow.entities import Param

    from tasks.params import load_params

    with tracking_client(project_dir, tracking) as (client, _):
        name = (tracking or {}).get("experiment") or DEFAULT_EXPERIMENT
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        run = client.create_run(experiment_id, run_name=run_name, tags={"pipeline": "rlhf", **tags})
        # Every params.yaml value as a dotted param: what `rlhf compare` and the MLflow UI diff.
        items = [Param(k, v) for k, v in flatten_params(load_params(project_dir / "params.yaml")).items()]
        for start in range(0, len(items), 100):
            client.log_batch(run.info.run_id, params=items[start:start + 100])
        return run.info.run_id


def run_tags(project_dir: Path, stages: list[dict[str, Any]] | None) -> dict[str, str]:
    """Tags that say what this run used and decided: each data source's identity (``source.*``) and,
    when ``promote`` had nothing new to judge, that the champion stayed (``promotion.*``)."""
    import json

    from tasks.sources import source_tags

    tags: dict[str, str] = {}
    ingest = project_dir / "metrics" / "ingest.json"
    if ingest.is_file():
        tags.update(source_tags(json.loads(ingest.read_text()).get("sources", {})))
    if any(s["stage"] == "promote" and not s["ran"] for s in stages or []):
        tags["promotion.decision"] = "unchanged: no new challenger (the policy and its inputs did not change)"
    return tags


def close_parent_run(project_dir: Path, tracking: dict[str, Any] | None, run_id: str, *, status: str,
                     summary_tags: dict[str, str] | None = None, stages: list[dict[str, Any]] | None = None) -> str:
    """Log the summary (metrics, params.yaml, dvc.lock, tags) and end the run; returns the tracking URI."""
    with tracking_client(project_dir, tracking) as (client, uri):
        if status == "FINISHED":
            log_parent_summary(
                run_id, metrics_dir=project_dir / "metrics", params_file=project_dir / "params.yaml",
                lock_file=project_dir / "dvc.lock", extra_tags={**run_tags(project_dir, stages), **(summary_tags or {})},
            )
        elif summary_tags:
            for key, value in summary_tags.items():
                client.set_tag(run_id, key, str(value))
        client.set_terminated(run_id, status=status)
        return uri


def download_run_record(project_dir: Path, tracking: dict[str, Any] | None, run_id: str, dest: Path) -> dict[str, Any]:
    """Fetch a parent run's record: commit, params.yaml, dvc.lock, metrics files and logged metric values."""
    with tracking_client(project_dir, tracking) as (client, uri):
        try:
            run = client.get_run(run_id)
        except Exception as err:  # MlflowException for an unknown id
            raise ValueError(f"no MLflow run {run_id!r} at {uri}: {err}") from err
        try:
            local = Path(client.download_artifacts(run_id, RECORD_DIR, str(dest)))
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
