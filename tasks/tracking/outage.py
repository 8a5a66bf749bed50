"""When the tracking server stops answering mid-run: the calls it missed are kept on disk and sent later.

Every logging call of a run goes through a :class:`RunSink`. While the server answers, a call is
sent at once. The first call that fails because the server is down (:func:`is_outage`, after the
bounded retries of ``tracking.timeout_s`` / ``tracking.max_retries``) opens a :class:`Journal` in
``<state>/tracking_pending/<name>-<run id>/`` (``state``: :func:`tasks.workspace.state_dir`), and
from then on every call of that run is written there instead, with a copy of each artifact file
(the workspace may change before the server is back). So a stage whose server dies goes on
training and keeps its outputs; the flow ends the pipeline run after it (``flows/alignment.py``).

``rlhf sync`` (:func:`sync_pending`) sends each journal's calls in their order, records how far it
got (``sent``), and removes the journal once every call is sent; the runs then hold exactly what an
uninterrupted run logs, their final status included.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_core.errors import UserFacingError
from tasks.tracking.client import log_batched
from tasks.workspace import state_dir

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

PENDING_DIR = "tracking_pending"
FILE_ARGS = {"log_artifact", "log_artifacts"}
"""Calls whose ``path`` argument is a file or folder: copied into the journal when kept."""


class TrackingUnavailable(UserFacingError):
    """The tracking server did not answer within the bounded timeout and retries."""


def is_outage(err: BaseException) -> bool:
    """True when ``err`` (from an MLflow call) means the tracking server did not answer: the connection
    was refused or reset, a request timed out, or the server kept failing (5xx) through every retry."""
    import requests

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def outage_reason(err: BaseException) -> str:
    """The short cause of an outage: ``Connection refused``, ``timed out``, ``too many 503 error responses``."""
    text = str(err)
    for pattern in (r"\[Errno -?\d+\] ([^'\")]+)", r"(too many \d+ error responses)", r"(timed out)"):
        if found := re.search(pattern, text):
            return found.group(1).strip()
    return type(err).__name__


def pending_dir(project_dir: Path) -> Path:
    """Where a workspace's journals live: ``<state>/tracking_pending``."""
    return state_dir(project_dir) / PENDING_DIR


def _plain(value: Any) -> Any:
    """JSON for what logging calls carry beside plain values (numpy scalars from samples tables)."""
    return value.item() if hasattr(value, "item") else str(value)


class Journal:
    """The calls one run could not send: ``meta.json``, ``calls.jsonl``, ``files/<n>/``, ``sent``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def open(cls, path: Path, meta: dict[str, Any]) -> Journal:
        journal = cls(path)
        (journal.path / "files").mkdir(parents=True, exist_ok=True)
        (journal.path / "meta.json").write_text(json.dumps({**meta, "since": time.time()}, indent=2) + "\n")
        return journal

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.path / "meta.json").read_text())

    def record(self, op: str, args: dict[str, Any]) -> None:
        if op in FILE_ARGS:
            source = Path(args["path"])
            kept = self.path / "files" / str(len(list((self.path / "files").iterdir()))) / source.name
            kept.parent.mkdir(parents=True)
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, kept)
            args = {**args, "path": kept.relative_to(self.path).as_posix()}
        with (self.path / "calls.jsonl").open("a") as fh:
            fh.write(json.dumps({"op": op, "args": args}, default=_plain) + "\n")

    def calls(self) -> list[tuple[str, dict[str, Any]]]:
        lines = (self.path / "calls.jsonl").read_text().splitlines() if (self.path / "calls.jsonl").exists() else []
        return [(c["op"], c["args"]) for c in map(json.loads, lines)]

    @property
    def sent(self) -> int:
        marker = self.path / "sent"
        return int(marker.read_text()) if marker.exists() else 0

    def replay(self, client: MlflowClient) -> int:
        """Send the calls not sent yet, in order; remove the journal when all are. Returns how many were sent now."""
        calls, start = self.calls(), self.sent
        for done, (op, args) in enumerate(calls[start:], start + 1):
            if op in FILE_ARGS:
                args = {**args, "path": str(self.path / args["path"])}
            CALLS[op](client, self.meta["run_id"], **args)
            (self.path / "sent").write_text(str(done))
        shutil.rmtree(self.path)
        return len(calls) - start


def _log_batch(client: MlflowClient, run_id: str, metrics=(), params=(), tags=()) -> None:
    from mlflow.entities import Metric, Param, RunTag

    log_batched(client, run_id, metrics=[Metric(*m) for m in metrics], params=[Param(*p) for p in params],
                tags=[RunTag(*t) for t in tags])


def _log_table(client: MlflowClient, run_id: str, rows: list[dict[str, Any]], name: str) -> None:
    import pandas as pd

    client.log_table(run_id, pd.DataFrame(rows), name)


def _log_inputs(client: MlflowClient, run_id: str, datasets: list[dict[str, Any]]) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    client.log_inputs(run_id, [DatasetInput(Dataset(**{k: v for k, v in d.items() if k != "context"}),
                                            tags=[InputTag(MLFLOW_DATASET_CONTEXT, d["context"])]) for d in datasets])


REGISTERED_MODEL_TAGS = ("registered_model.name", "registered_model.version", "registered_model.uri")
"""Tags of a pipeline run that registered a model version: its name, version and ``models:/<name>/<version>``."""


def _logged_model_of(client: MlflowClient, version: Any) -> str | None:
    """The id of the logged model a version was registered from: the output of the version's run whose files are
    the version's source (a database registry store does not keep a version's ``model_id``)."""
    if not version.run_id:
        return None
    for output in client.get_run(version.run_id).outputs.model_outputs:
        if client.get_logged_model(output.model_id).artifact_location == version.source:
            return output.model_id
    return None


def _link_registered_version(client: MlflowClient, run_id: str, name: str) -> None:
    """Link the run to the version of model ``name`` that its pipeline run registered (version tag
    ``pipeline.run_id`` = ``run_id``; the newest if several), if any: the version's logged model as an
    output of the run (what MLflow's UI lists under the run's "Registered models") and
    :data:`REGISTERED_MODEL_TAGS`. Resolved when sent, so a replayed journal links what the registry holds then."""
    from mlflow.entities import LoggedModelOutput, RunTag

    found = client.search_model_versions(f"name = '{name}' and tags.`pipeline.run_id` = '{run_id}'")
    if not found:
        return
    version = max(found, key=lambda v: int(v.version))
    if model_id := version.model_id or _logged_model_of(client, version):
        client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
    values = (name, str(version.version), f"models:/{name}/{version.version}")
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in zip(REGISTERED_MODEL_TAGS, values)])


CALLS: dict[str, Callable[..., None]] = {
    "log_batch": _log_batch,
    "log_artifact": lambda client, run_id, path, artifact_path=None: client.log_artifact(run_id, path, artifact_path),
    "log_artifacts": lambda client, run_id, path, artifact_path=None: client.log_artifacts(run_id, path, artifact_path),
    "log_dict": lambda client, run_id, obj, name: client.log_dict(run_id, obj, name),
    "log_table": _log_table,
    "log_inputs": _log_inputs,
    "link_registered_version": _link_registered_version,
    "set_terminated": lambda client, run_id, status: client.set_terminated(run_id, status=status),
}
"""Every logging call a run makes, by name, with JSON arguments: sent live and replayed from a journal alike."""


class RunSink:
    """Sends one run's logging calls; once the server is down, keeps them in a :class:`Journal` (if ``journal_dir``)."""

    def __init__(self, client: MlflowClient, run_id: str, *, journal_dir: Path | None = None, name: str = "run",
                 uri: str = "", parent_run_id: str | None = None, announce: Callable[[str], None] | None = None) -> None:
        self.client = client
        self.announce = announce
        """Told once, when the server stops answering and the journal opens (a stage prints it into its log)."""
        self.run_id = run_id
        self.journal_dir = journal_dir
        self.name = name
        self.uri = uri
        self.parent_run_id = parent_run_id
        self.journal: Journal | None = None

    def send(self, op: str, **args: Any) -> None:
        if self.journal is None:
            try:
                CALLS[op](self.client, self.run_id, **args)
                return
            except Exception as err:
                if self.journal_dir is None or not is_outage(err):
                    raise
                self.journal = Journal.open(self.journal_dir / f"{self.name}-{self.run_id}", {
                    "name": self.name, "run_id": self.run_id, "uri": self.uri, "parent_run_id": self.parent_run_id,
                    "reason": outage_reason(err)})
                if self.announce is not None:
                    self.announce(f"[rlhf] {self.name}: the MLflow tracking server {self.uri} stopped answering "
                                  f"({outage_reason(err)}); work goes on, and what it cannot log is kept in {self.journal.path} "
                                  "for `rlhf sync`")
        self.journal.record(op, args)


def pending_journals(project_dir: Path, *, parent_run_id: str | None = None) -> list[Journal]:
    """The workspace's journals, oldest first (only those of one pipeline run's stages and parent, if given)."""
    root = pending_dir(project_dir)
    journals = [Journal(p) for p in root.iterdir() if (p / "meta.json").exists()] if root.is_dir() else []
    if parent_run_id is not None:
        journals = [j for j in journals if parent_run_id in (j.meta["parent_run_id"], j.meta["run_id"])]
    return sorted(journals, key=lambda j: j.meta["since"])


def sync_pending(project_dir: Path, client_for: Callable[[str], MlflowClient]) -> list[tuple[dict[str, Any], int]]:
    """Replay every pending journal through ``client_for(its server's URI)``; returns (meta, calls sent) per journal.

    Raises :class:`TrackingUnavailable` if the server is still down (journals stay, partly sent ones resume later).
    """
    done = []
    for journal in pending_journals(project_dir):
        meta = journal.meta
        try:
            done.append((meta, journal.replay(client_for(meta["uri"]))))
        except Exception as err:
            if not is_outage(err):
                raise
            raise TrackingUnavailable(f"the MLflow tracking server {meta['uri']} still does not answer ({outage_reason(err)}); "
                                      f"nothing is lost: {len(pending_journals(project_dir))} run(s) wait in "
                                      f"{pending_dir(project_dir)}, run `rlhf sync` again once it is up") from None
    return done
