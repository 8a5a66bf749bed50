"""MLflow glue shared by every stage: where runs go, what a stage run records, model registry.

A stage process (``python -m tasks.<stage>``, started by ``dvc repro``) opens its run with
:func:`stage_run`. When the Prefect flow runs the pipeline, it opens the parent run itself
and passes its id in ``$RLHF_PARENT_RUN_ID``; the stage's run is then a child of it (the
parent lives in another process, so it is named by id, not found as the active run).
Runs started by a plain ``dvc repro`` are standalone.

What a stage run records:

- tags ``stage``, ``git.commit``, ``git.dirty``, ``git.branch``, ``mlflow.source.git.commit``;
- its own ``params.yaml`` keys, flattened (``sft.learning_rate``), 100 per request;
- step-wise curves through :meth:`StageTracker.log_fn` (the ``log_fn(metrics, step)`` callback
  of the ``rlhf_core`` trainers), buffered and sent with ``log_batch``: one request per
  200 values, not one per step (1000 single calls over HTTP take ~14 s, one batch ~0.2 s);
- final metrics, artifacts, tables, dataset inputs with MLflow's content digests, and the
  DVC hash of each output as tags ``dvc.hash.<relpath>``.

``mlflow`` is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.workspace import file_md5

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

PARENT_RUN_ENV = "RLHF_PARENT_RUN_ID"
RECORD_DIR = "pipeline"  # artifact folder of a parent run: params.yaml, dvc.lock, metrics/
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_EXPERIMENT = "rlhf-pipeline"
UNKNOWN = "unknown"

PARAMS_PER_BATCH = 100  # MLflow's limit on params (and tags) per log_batch request
METRICS_PER_BATCH = 1000  # MLflow's limit on metrics per log_batch request
PARAM_VALUE_LIMIT = 6000  # MLflow 3.x param value limit (it was 500 before MLflow 2.3 / 250 before 1.x)
FLUSH_EVERY = 200  # buffered metric values that trigger a log_batch



# --------------------------------------------------------------------------- where runs go


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


@contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow at ``uri`` for the block; undo the ``$MLFLOW_TRACKING_URI`` it sets.

    ``mlflow.set_tracking_uri`` also exports ``$MLFLOW_TRACKING_URI``, which would then win in
    every later :func:`resolve_tracking_uri` of this process (a second project in the same
    process would log into the first one's database).
    """
    import mlflow

    before = os.environ.get(TRACKING_URI_ENV)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TRACKING_URI_ENV, None)
        else:
            os.environ[TRACKING_URI_ENV] = before


def git_info(project_dir: Path) -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool, "branch": name}`` of the git repo at ``project_dir``.

    ``dirty`` means tracked files differ from HEAD (untracked files do not count: DVC outputs
    and caches are ignored or untracked). A detached HEAD gives branch ``"detached"``.
    Without git, or outside a repo, every value is ``"unknown"``.
    """

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=project_dir, capture_output=True, text=True, timeout=30, check=True)
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return {"commit": UNKNOWN, "dirty": UNKNOWN, "branch": UNKNOWN}
    return {"commit": commit, "dirty": dirty, "branch": "detached" if branch == "HEAD" else branch}


# --------------------------------------------------------------------------- small pure helpers


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params as dotted keys with string values: ``{"sft": {"lr": 1e-4}}`` -> ``{"sft.lr": "0.0001"}``.

    Values longer than MLflow's limit (:data:`PARAM_VALUE_LIMIT`) are cut, with a warning.
    An empty mapping is kept as the value ``"{}"``.
    """
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, name + "."))
            continue
        text = str(value)
        if len(text) > PARAM_VALUE_LIMIT:
            logger.warning("param %s is %d chars; MLflow keeps %d, logging it cut", name, len(text), PARAM_VALUE_LIMIT)
            text = text[: PARAM_VALUE_LIMIT - 3] + "..."
        out[name] = text
    return out


def params_hash(params: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``params`` (sorted keys, no spaces; non-JSON values as str)."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, or None for strings, None, non-scalars, NaN and inf."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        number = float(value)  # ints, bools, numpy and 0-d torch scalars
    except (TypeError, ValueError, RuntimeError):
        return None
    return number if math.isfinite(number) else None


def dvc_md5(path: Path) -> str:
    """The md5 DVC 3 records in ``dvc.lock`` for an output (file or directory).

    A file: the md5 of its bytes. A directory: DVC's ``.dir`` object, i.e. the md5 of the JSON
    list ``[{"md5": <file md5>, "relpath": <posix relpath>}, ...]`` sorted by relpath
    (``json.dumps(..., sort_keys=True)``), with ``".dir"`` appended. Difference from DVC: it
    does not apply ``.dvcignore`` rules, so a directory holding ignored files hashes differently.
    """
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    if not path.is_dir():
        raise FileNotFoundError(f"cannot hash output {path}: no such file or directory")
    entries = sorted(
        ({"md5": file_md5(f), "relpath": f.relative_to(path).as_posix()} for f in path.rglob("*") if f.is_file()),
        key=lambda entry: entry["relpath"],
    )
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing).hexdigest() + ".dir"


def _relpath(path: Path, project_dir: Path) -> str:
    path, root = Path(path).resolve(), Path(project_dir).resolve()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()


# --------------------------------------------------------------------------- a stage's run


class StageTracker:
    """Logging handle of one stage run (yielded by :func:`stage_run`).

    Curves go through :meth:`log_fn`, which buffers; everything else is sent at once.
    :meth:`log_dataset` uses MLflow's active run, so call it inside the ``stage_run`` block.
    """

    def __init__(self, client: MlflowClient, run_id: str, stage: str, *, flush_every: int = FLUSH_EVERY) -> None:
        self.client = client
        self.run_id = run_id
        self.stage = stage
        self.flush_every = flush_every
        self._buffer: list[Any] = []  # mlflow.entities.Metric

    # curves
    def log_fn(self, metrics: Mapping[str, Any], step: int) -> None:
        """Trainer callback: buffer ``metrics`` at ``step``; send once :attr:`flush_every` values wait.

        Non-numeric and non-finite values are skipped (logged at debug level): MLflow rejects
        NaN on some backends, and one bad value must not stop a training run.
        """
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        for key, raw in metrics.items():
            value = _finite(raw)
            if value is None:
                logger.debug("%s: skipping metric %s=%r at step %d (not a finite number)", self.stage, key, raw, step)
                continue
            self._buffer.append(Metric(key=key, value=value, timestamp=timestamp, step=int(step)))
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Send the buffered metric values, at most :data:`METRICS_PER_BATCH` per request."""
        pending, self._buffer = self._buffer, []
        for start in range(0, len(pending), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=pending[start:start + METRICS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Final (or one-off) metrics, sent now together with anything buffered."""
        self.log_fn(metrics, 0 if step is None else step)
        self.flush()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for start in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=items[start:start + PARAMS_PER_BATCH])

    # files
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        """``obj`` as a JSON (``.json``) or YAML (``.yaml``/``.yml``) artifact called ``name``."""
        self.client.log_dict(self.run_id, obj, name)

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        """Rows (e.g. decoded samples with rewards) as an MLflow table artifact ``name`` (``*.json``)."""
        import mlflow
        import pandas as pd

        mlflow.log_table(pd.DataFrame(rows), artifact_file=name, run_id=self.run_id)

    def log_dataset(self, df: pd.DataFrame, name: str, context: str, source: str) -> None:
        """Record ``df`` as an input of this run (MLflow computes its content digest)."""
        import mlflow
        import mlflow.data

        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            raise RuntimeError(f"log_dataset({name!r}) must be called inside the stage_run block of run {self.run_id}")
        with warnings.catch_warnings():  # MLflow registers the local source twice and warns about it
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
            dataset = mlflow.data.from_pandas(df, source=source, name=name)
        mlflow.log_input(dataset, context=context)

    def log_output_hashes(self, paths: list[Path], project_dir: Path) -> dict[str, str]:
        """Tag the run with the DVC md5 of each output: ``dvc.hash.<relpath>`` (see :func:`dvc_md5`).

        The hash is computed from the files, not read from ``dvc.lock``: a stage logs while
        ``dvc repro`` runs its command, and DVC rewrites ``dvc.lock`` only after the command
        exits, so the lock still holds the previous run's hashes. Computed the same way, the
        tag equals what DVC records next. Missing outputs are skipped with a warning.
        Returns the tags it set.
        """
        from mlflow.entities import RunTag

        tags: dict[str, str] = {}
        for path in paths:
            if not Path(path).exists():
                logger.warning("%s: output %s does not exist; no hash logged", self.stage, path)
                continue
            tags[f"dvc.hash.{_relpath(path, project_dir)}"] = dvc_md5(Path(path))
        items = [RunTag(k, v) for k, v in tags.items()]
        for start in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=items[start:start + PARAMS_PER_BATCH])
        return tags


def _experiment_id(client: MlflowClient, name: str) -> str:
    """Id of experiment ``name``, created if missing (tolerates a concurrent creator)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # another stage process created it in between
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


@contextmanager
def stage_run(
    stage: str, params: Mapping[str, Any], *, project_dir: Path, tracking: Mapping[str, Any] | None = None
) -> Iterator[StageTracker]:
    """Open the MLflow run of ``stage`` and yield its :class:`StageTracker`.

    ``tracking`` is params.yaml's ``tracking`` group (``uri``, ``experiment``). The run is a
    child of ``$RLHF_PARENT_RUN_ID`` when that is set. Buffered metrics are sent at exit, also
    when the block raises; then the run ends FAILED (KILLED on Ctrl-C) and the error propagates.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Param

    tracking = tracking or {}
    project_dir = Path(project_dir).resolve()
    uri = resolve_tracking_uri(tracking.get("uri"), project_dir)
    parent = os.environ.get(PARENT_RUN_ENV, "").strip() or None
    git = git_info(project_dir)
    tags = {"stage": stage, "git.commit": str(git["commit"]), "git.dirty": str(git["dirty"]), "git.branch": str(git["branch"])}
    if git["commit"] != UNKNOWN:
        tags["mlflow.source.git.commit"] = git["commit"]

    with _tracking_uri(uri):
        client = MlflowClient(uri)
        experiment_id = _experiment_id(client, tracking.get("experiment") or DEFAULT_EXPERIMENT)
        # Without a parent id, a run already active in this thread (a caller's) becomes the parent.
        nested = parent is None and mlflow.active_run() is not None
        run = mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent, nested=nested, tags=tags)
        tracker = StageTracker(client, run.info.run_id, stage)
        try:
            items = [Param(k, v) for k, v in flatten_params(params).items()]
            for start in range(0, len(items), PARAMS_PER_BATCH):
                client.log_batch(tracker.run_id, params=items[start:start + PARAMS_PER_BATCH])
            yield tracker
            tracker.flush()
        except BaseException as err:
            try:  # keep the curve up to the crash; never hide the original error
                tracker.flush()
            except Exception as flush_err:
                logger.warning("%s: could not send buffered metrics: %s", stage, flush_err)
            mlflow.end_run(status="KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        mlflow.end_run(status="FINISHED")


# --------------------------------------------------------------------------- the parent run's summary


def _flatten_metrics(tree: Mapping[str, Any], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, raw in tree.items():
        name = f"{prefix}/{key}"
        if isinstance(raw, Mapping):
            out.update(_flatten_metrics(raw, name))
        elif (value := _finite(raw)) is not None:
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
    run_id: str, *, metrics_dir: Path, params_file: Path, lock_file: Path, extra_tags: Mapping[str, Any]
) -> dict[str, float]:
    """Summarise a pipeline run on its parent run (current tracking URI).

    Logs every finite number in ``metrics_dir/*.json`` as ``<stage>/<key>`` (nested keys joined
    by ``/``; also for stages DVC skipped), ``params_file`` and ``lock_file`` as artifacts
    (when they exist) and ``extra_tags``. Returns the metrics it logged.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    client = MlflowClient()
    metrics = metrics_dir_values(Path(metrics_dir))
    timestamp = int(time.time() * 1000)
    entries = [Metric(k, v, timestamp, 0) for k, v in metrics.items()]
    for start in range(0, len(entries), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=entries[start:start + METRICS_PER_BATCH])
    tags = [RunTag(k, str(v)) for k, v in extra_tags.items()]
    for start in range(0, len(tags), PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=tags[start:start + PARAMS_PER_BATCH])
    # The run's record, what `rlhf reproduce` rebuilds from: pipeline/{params.yaml,dvc.lock,metrics/*.json}.
    for path in (Path(params_file), Path(lock_file)):
        if path.is_file():
            client.log_artifact(run_id, str(path), RECORD_DIR)
    for path in sorted(Path(metrics_dir).glob("*.json")):
        client.log_artifact(run_id, str(path), f"{RECORD_DIR}/metrics")
    return metrics
