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
    log_flat_params(client, run.info.run_id, project_dir / "params.yaml")
    return run.info.run_id


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def log_flat_params(client, run_id: str, params_file: Path) -> None:
    """Every params.yaml value as a dotted MLflow param (what ``rlhf compare`` and the UI diff)."""
    from mlflow.entities import Param

    from tasks.params import load_params

    items = [Param(k, str(v)[:6000]) for k, v in flatten(load_params(params_file)).items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])


def close_parent_run(project_dir: Path, tracking: dict[str, Any] | None, run_id: str, *, status: str,
                     summary_tags: dict[str, str] | None = None) -> str:
    """Log the summary (metrics, params.yaml, dvc.lock, tags) and end the run; returns the tracking URI."""
    from tasks.tracking import log_parent_summary

    client, uri = _client(project_dir, tracking)
    if status == "FINISHED":
        log_run_record(client, run_id, project_dir)
        log_parent_summary(
            run_id, metrics_dir=project_dir / "metrics", params_file=project_dir / "params.yaml",
            lock_file=project_dir / "dvc.lock", extra_tags=summary_tags or {},
        )
    client.set_terminated(run_id, status=status)
    return uri


RECORD_DIR = "pipeline"  # artifact folder of the parent run holding params.yaml, dvc.lock, metrics/


def log_run_record(client, run_id: str, project_dir: Path) -> None:
    """What ``rlhf reproduce`` needs: params.yaml, dvc.lock and metrics/*.json as artifacts."""
    for name in ("params.yaml", "dvc.lock"):
        if (project_dir / name).exists():
            client.log_artifact(run_id, str(project_dir / name), RECORD_DIR)
    for path in sorted((project_dir / "metrics").glob("*.json")):
        client.log_artifact(run_id, str(path), f"{RECORD_DIR}/metrics")


def download_run_record(project_dir: Path, tracking: dict[str, Any] | None, run_id: str, dest: Path) -> dict[str, Any]:
    """Fetch a parent run's record: commit, params.yaml, dvc.lock, metrics files and logged metric values."""
    client, _ = _client(project_dir, tracking)
    try:
        run = client.get_run(run_id)
    except Exception as err:  # MlflowException: unknown id
        raise ValueError(f"no MLflow run {run_id!r} at {_client(project_dir, tracking)[1]}: {err}") from err
    local = Path(client.download_artifacts(run_id, RECORD_DIR, str(dest)))
    params, lock = local / "params.yaml", local / "dvc.lock"
    if not params.exists() or not lock.exists():
        raise ValueError(f"run {run_id} has no params.yaml/dvc.lock under '{RECORD_DIR}/': is it a pipeline parent run?")
    from tasks.reproduce import flatten_metrics

    return {
        "commit": run.data.tags.get("git.commit", ""),
        "params": params,
        "lock": lock,
        "metrics": sorted((local / "metrics").glob("*.json")),
        "logged_metrics": flatten_metrics(local / "metrics"),
    }
