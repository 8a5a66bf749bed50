"""The parent MLflow run of one pipeline run: opened by the flow, closed with its summary.

Stage processes nest their runs under it through ``$RLHF_PARENT_RUN_ID``. At the end it gets
every ``metrics/*.json`` value (also of stages DVC skipped), ``params.yaml``, ``dvc.lock``,
the git commit and dirty flag, and the Prefect flow-run id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _client(project_dir: Path, tracking: dict[str, Any] | None):
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri((tracking or {}).get("uri"), project_dir)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri), uri


def open_parent_run(project_dir: Path, tracking: dict[str, Any] | None, *, run_name: str, tags: dict[str, str]) -> str:
    """Create the parent run (left RUNNING for the stage processes) and return its id."""
    import mlflow

    client, _ = _client(project_dir, tracking)
    experiment = (tracking or {}).get("experiment") or "rlhf-pipeline"
    exp = mlflow.set_experiment(experiment)
    run = client.create_run(exp.experiment_id, run_name=run_name, tags={"pipeline": "rlhf", **tags})
    return run.info.run_id


def close_parent_run(project_dir: Path, tracking: dict[str, Any] | None, run_id: str, *, status: str,
                     summary_tags: dict[str, str] | None = None) -> str:
    """Log the summary (metrics, params.yaml, dvc.lock, tags) and end the run; returns the tracking URI."""
    from tasks.tracking import log_parent_summary

    client, uri = _client(project_dir, tracking)
    if status == "FINISHED":
        log_parent_summary(
            run_id, metrics_dir=project_dir / "metrics", params_file=project_dir / "params.yaml",
            lock_file=project_dir / "dvc.lock", extra_tags=summary_tags or {},
        )
    client.set_terminated(run_id, status=status)
    return uri
