"""Where runs go, and the one way this project reaches MLflow: a client bound to that URI.

Every module that talks to MLflow gets a :class:`Tracking` from :func:`connect` (or is handed
its ``client``) and passes the run id explicitly. MLflow's global tracking URI, the
``$MLFLOW_TRACKING_URI`` that ``mlflow.set_tracking_uri`` exports, and the fluent "active
run" are never touched, so one process can serve several workspaces and stores.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
PARENT_RUN_ENV = "RLHF_PARENT_RUN_ID"
"""The flow's parent run id, passed to each stage process; the stage's run becomes its child."""

PARAMS_PER_BATCH = 100  # MLflow's limit on params (and tags) per log_batch request
METRICS_PER_BATCH = 1000  # MLflow's limit on metrics per log_batch request


def resolve_tracking_uri(configured: str | None = None, project_dir: Path | None = None) -> str:
    """The tracking URI a process should use.

    Precedence: ``$MLFLOW_TRACKING_URI`` (verbatim), then ``configured`` (params.yaml
    ``tracking.uri``), then ``sqlite:///<project_dir>/mlflow.db``. A relative SQLite path or a
    relative plain path in ``configured`` is made absolute against ``project_dir`` (default:
    the current directory), because stage workers run in other directories.
    """
    from_env = os.environ.get(TRACKING_URI_ENV, "").strip()
    if from_env:
        return from_env
    root = Path(project_dir if project_dir is not None else Path.cwd()).resolve()
    if not configured:
        return f"sqlite:///{root / 'mlflow.db'}"
    configured = configured.strip()
    if configured.startswith("sqlite:///"):
        path = configured[len("sqlite:///"):]  # sqlite:////abs/x.db -> "/abs/x.db"
        return configured if Path(path).is_absolute() else f"sqlite:///{(root / path).resolve()}"
    if "://" not in configured and not configured.startswith("file:") and configured != "databricks":
        return str((root / configured).resolve())  # a bare path: MLflow's file store
    return configured


def local_artifact_location(uri: str) -> str | None:
    """Where an experiment created in the store ``uri`` keeps its runs' and models' artifacts, when
    the project must say it: ``mlruns/`` next to a SQLite database, as an absolute ``file://`` URI
    (``<workspace>/mlruns`` for the default store), so the artifacts stay with the store whichever
    folder the creating process runs in (MLflow would use that process's ``./mlruns``). ``None``
    (the store's own choice) for any other store: a file store keeps artifacts inside itself, an
    ``http(s)`` tracking server has its artifact root.
    """
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]  # sqlite:////abs/x.db -> "/abs/x.db"
    if path in ("", ":memory:"):
        return None
    return (Path(path).resolve().parent / "mlruns").as_uri()


@dataclass
class TrackingConfig:
    """The ``tracking`` group of ``params.yaml``."""

    uri: str | None = None
    """``null``: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<project>/mlflow.db`` (:func:`resolve_tracking_uri`)."""
    experiment: str = "rlhf-pipeline"
    registered_model: str = "rlhf-policy"
    """The Model Registry name the trained policy is registered under (``@champion``, ``@challenger``)."""
    timeout_s: int = 10
    """Seconds one request to an ``http(s)`` tracking server may take (``$MLFLOW_HTTP_REQUEST_TIMEOUT``)."""
    max_retries: int = 2
    """Retries of a failed request, 0 s then 2 s apart (``$MLFLOW_HTTP_REQUEST_MAX_RETRIES``). A server that
    refuses connections counts as down after ~3 s, one that accepts and never answers after
    ``(1 + max_retries) * timeout_s`` + 3 s (33 s by default), instead of MLflow's ~4 min."""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if not 0 <= self.max_retries <= 10:  # MLflow refuses more than 10
            raise ValueError(f"max_retries must be in [0, 10], got {self.max_retries}")

    def http_limits(self) -> dict[str, str]:
        """MLflow's request settings for these bounds (it reads them from the environment on every request)."""
        return {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(self.timeout_s), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(self.max_retries),
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


@dataclass(frozen=True)
class Tracking:
    """A project's MLflow store: the client bound to it, its URI, and the ``tracking`` settings."""

    client: MlflowClient
    uri: str
    config: TrackingConfig

    @property
    def experiment(self) -> str:
        return self.config.experiment

    @property
    def registered_model(self) -> str:
        return self.config.registered_model

    def experiment_id(self) -> str:
        """Id of :attr:`experiment`, created if missing (tolerates a concurrent creator), with its artifacts
        next to a SQLite store (:func:`local_artifact_location`)."""
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment, artifact_location=local_artifact_location(self.uri),
                                                 tags=EXPERIMENT_TAGS)
        except MlflowException:  # another stage process created it in between
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id


EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
"""Tags of an experiment the pipeline creates: the MLflow UI opens it on its model-training runs view (not GenAI traces)."""


def connect(project_dir: Path, tracking: Mapping[str, Any] | None = None) -> Tracking:
    """The project's store: ``tracking`` is params.yaml's ``tracking`` group (:class:`TrackingConfig`;
    a key set to null takes its default).

    The registry is the client's default for that URI (the tracking store itself, unless
    ``$MLFLOW_REGISTRY_URI`` names another). Every request of this process is bounded by
    ``timeout_s`` and ``max_retries`` from then on (MLflow's ``$MLFLOW_HTTP_REQUEST_*``, set here).
    """
    from mlflow import MlflowClient

    from rlhf_core.config import config_from_dict

    config = config_from_dict(TrackingConfig, {k: v for k, v in (tracking or {}).items() if v is not None}, section="tracking")
    uri = resolve_tracking_uri(config.uri, Path(project_dir))
    os.environ.update(config.http_limits())  # params.yaml's bounds; stage processes apply their own on connect
    return Tracking(MlflowClient(tracking_uri=uri), uri, config)


def warm_up(project_dir: Path, tracking: Mapping[str, Any] | None = None) -> threading.Thread:
    """Import MLflow and open the project's store (a new local store creates its tables: ~2 s on 2 cores) in a thread,
    for a caller with something else to wait for meanwhile (``rlhf run``: the Prefect server's start). Join it before
    using the store. It never raises: what goes wrong is met again, and reported, where the run uses the store."""

    def work() -> None:
        with suppress(Exception):
            store = connect(project_dir, tracking)
            if store.uri.startswith("sqlite:"):  # a server's store is the server's business
                store.client.search_experiments(max_results=1)

    thread = threading.Thread(target=work, name="mlflow-warm-up", daemon=True)
    thread.start()
    return thread


def log_batched(client: MlflowClient, run_id: str, *, metrics: Sequence[Any] = (), params: Sequence[Any] = (),
                tags: Sequence[Any] = ()) -> None:
    """``client.log_batch`` in as few requests as MLflow's per-request limits allow."""
    for start in range(0, len(metrics), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=list(metrics[start:start + METRICS_PER_BATCH]))
    for start in range(0, len(params), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=list(params[start:start + PARAMS_PER_BATCH]))
    for start in range(0, len(tags), PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=list(tags[start:start + PARAMS_PER_BATCH]))


def log_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    log_batched(client, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
