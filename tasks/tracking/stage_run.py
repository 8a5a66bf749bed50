"""A stage's MLflow run: opened by :func:`stage_run`, logged to through :class:`StageTracker`.

A stage process (``python -m tasks.<stage>``, started by ``dvc repro``) opens its run with
:func:`stage_run`. When the Prefect flow runs the pipeline, it opens the parent run itself and
passes its id in ``$RLHF_PARENT_RUN_ID``; the stage's run is then a child of it (the parent
lives in another process, so it is named by id). Runs started by a plain ``dvc repro`` are
standalone.

What a stage run records:

- tags ``stage``, ``git.commit``, ``git.dirty``, ``git.branch``, ``mlflow.source.git.commit``;
- its own ``params.yaml`` keys, flattened (``sft.learning_rate``), 100 per request;
- step-wise curves through :meth:`StageTracker.log_fn` (the ``log_fn(metrics, step)`` callback
  of the ``rlhf_core`` trainers), buffered and sent with ``log_batch``: one request per
  200 values, not one per step (1000 single calls over HTTP take ~14 s, one batch ~0.2 s);
- final metrics, artifacts, tables, dataset inputs with MLflow's content digests, and the
  DVC hash of each output as tags ``dvc.hash.<relpath>``;
- the host and pid of the stage process (``rlhf.host``, ``rlhf.pid``: :mod:`tasks.tracking.lifecycle`).

Everything goes through the run's :class:`~tasks.tracking.outage.RunSink`: if the tracking server
stops answering, the stage goes on and what it could not log is kept for ``rlhf sync``.
``mlflow`` is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.tracking.client import PARENT_RUN_ENV, connect
from tasks.tracking.dvc_hash import dvc_md5
from tasks.tracking.gitinfo import git_tags
from tasks.tracking.lifecycle import create_run
from tasks.tracking.outage import RunSink, pending_dir
from tasks.tracking.values import finite_number, flatten_params

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

FLUSH_EVERY = 200  # buffered metric values that trigger a log_batch


def _relpath(path: Path, project_dir: Path) -> str:
    path, root = Path(path).resolve(), Path(project_dir).resolve()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()


class StageTracker:
    """Logging handle of one stage run (yielded by :func:`stage_run`).

    Curves go through :meth:`log_fn`, which buffers; everything else is sent at once (through ``sink``).
    """

    def __init__(self, sink: RunSink, stage: str, *, flush_every: int = FLUSH_EVERY) -> None:
        self.sink = sink
        self.client = sink.client
        self.run_id = sink.run_id
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
            value = finite_number(raw)
            if value is None:
                logger.debug("%s: skipping metric %s=%r at step %d (not a finite number)", self.stage, key, raw, step)
                continue
            self._buffer.append(Metric(key=key, value=value, timestamp=timestamp, step=int(step)))
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Send the buffered metric values in as few requests as MLflow allows."""
        pending, self._buffer = self._buffer, []
        if pending:
            self.sink.send("log_batch", metrics=[[m.key, m.value, m.timestamp, m.step] for m in pending])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Final (or one-off) metrics, sent now together with anything buffered."""
        self.log_fn(metrics, 0 if step is None else step)
        self.flush()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.sink.send("log_batch", tags=[[k, str(v)] for k, v in tags.items()])

    # files
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.sink.send("log_artifact", path=str(path), artifact_path=artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self.sink.send("log_artifacts", path=str(directory), artifact_path=artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        """``obj`` as a JSON (``.json``) or YAML (``.yaml``/``.yml``) artifact called ``name``."""
        self.sink.send("log_dict", obj=obj, name=name)

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        """Rows (e.g. decoded samples with rewards) as an MLflow table artifact ``name`` (``*.json``)."""
        self.sink.send("log_table", rows=rows, name=name)

    def log_dataset(self, df: pd.DataFrame, name: str, context: str, source: str) -> None:
        """Record ``df`` as an input of this run (MLflow computes its content digest and schema)."""
        import mlflow.data

        from tasks.tracking.dataset_schema import schema_rows

        with warnings.catch_warnings():  # MLflow registers the local source twice and warns about it
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")  # a model-serving hint
            dataset = mlflow.data.from_pandas(df, source=source, name=name)
            rows = schema_rows(df)
            if rows is not None:  # the same schema, inferred from one row of each kind instead of value by value
                dataset.schema = mlflow.data.from_pandas(df.iloc[rows]).schema  # (a cached property to_dict reads)
            entity = dataset.to_dict()  # what mlflow.log_input sends, through this run's sink
        self.sink.send("log_inputs", datasets=[{
            "name": entity["name"], "digest": entity["digest"], "source_type": entity["source_type"],
            "source": entity["source"], "schema": entity.get("schema"), "profile": entity.get("profile"), "context": context,
        }])

    def log_output_hashes(self, paths: list[Path], project_dir: Path) -> dict[str, str]:
        """Tag the run with the DVC md5 of each output: ``dvc.hash.<relpath>`` (see :func:`dvc_md5`).

        The hash is computed from the files, not read from ``dvc.lock``: a stage logs while
        ``dvc repro`` runs its command, and DVC rewrites ``dvc.lock`` only after the command
        exits, so the lock still holds the previous run's hashes. Computed by DVC's own code,
        the tag equals what DVC records next. Missing outputs are skipped with a warning.
        Returns the tags it set.
        """
        tags: dict[str, str] = {}
        for path in paths:
            if not Path(path).exists():
                logger.warning("%s: output %s does not exist; no hash logged", self.stage, path)
                continue
            tags[f"dvc.hash.{_relpath(path, project_dir)}"] = dvc_md5(Path(path), project_dir)
        self.set_tags(tags)
        return tags


@contextmanager
def stage_run(
    stage: str, params: Mapping[str, Any], *, project_dir: Path, tracking: Mapping[str, Any] | None = None
) -> Iterator[StageTracker]:
    """Open the MLflow run of ``stage`` and yield its :class:`StageTracker`.

    ``tracking`` is params.yaml's ``tracking`` group (``uri``, ``experiment``). The run is a
    child of ``$RLHF_PARENT_RUN_ID`` when that is set. Buffered metrics are sent at exit, also
    when the block raises; then the run ends FAILED (KILLED on Ctrl-C) and the error propagates.
    A server that does not answer as the run opens stops the stage before it starts
    (:class:`~tasks.tracking.outage.TrackingUnavailable`); one that stops answering later does not
    stop it (:class:`~tasks.tracking.outage.RunSink`; ``tracker.sink.journal`` then says where the rest went).
    """
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    project_dir = Path(project_dir).resolve()
    store = connect(project_dir, tracking)
    parent = os.environ.get(PARENT_RUN_ENV, "").strip() or None
    tags = {"stage": stage, **git_tags(project_dir)}
    if parent:
        tags[MLFLOW_PARENT_RUN_ID] = parent
    # resolve_tags adds what mlflow.start_run would (user, source name and type).
    run_id = create_run(store, run_name=stage, tags=resolve_tags(tags), params=flatten_params(params),
                        doing=f"stage '{stage}' did not start")
    sink = RunSink(store.client, run_id, journal_dir=pending_dir(project_dir), name=stage, uri=store.uri, parent_run_id=parent,
                   announce=lambda message: print(message, flush=True))
    tracker = StageTracker(sink, stage)
    try:
        yield tracker
        tracker.flush()
    except BaseException as err:
        try:  # keep the curve up to the crash; never hide the original error
            tracker.flush()
            sink.send("set_terminated", status="KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        except Exception as close_err:
            logger.warning("%s: could not close the run: %s", stage, close_err)
        raise
    sink.send("set_terminated", status="FINISHED")
