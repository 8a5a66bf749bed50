"""A run's life: created tagged with the process that owns it, closed by a later run if that process died.

Every run the pipeline creates (the flow's parent run, each stage's run) carries ``rlhf.host`` and
``rlhf.pid``: the process that ends it. A process killed outright (``kill -9``, a lost machine)
cannot end its runs, which would stay RUNNING forever; the next pipeline run closes them first
(:func:`close_stale_runs`): a RUNNING run of this host whose process is gone is marked KILLED and
tagged ``rlhf.closed_by``. Runs whose calls wait in a journal for ``rlhf sync`` are left alone:
their final state is in the journal (:mod:`tasks.tracking.outage`).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.tracking.client import log_batched, log_tags
from tasks.tracking.outage import TrackingUnavailable, is_outage, outage_reason

if TYPE_CHECKING:
    from mlflow.entities import Run

    from tasks.tracking.client import Tracking

OWNER_HOST = "rlhf.host"
OWNER_PID = "rlhf.pid"
CLOSED_BY = "rlhf.closed_by"


def owner_tags() -> dict[str, str]:
    """The tags that name this process as a run's owner."""
    return {OWNER_HOST: socket.gethostname(), OWNER_PID: str(os.getpid())}


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a zombie, ended but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): it answered the signal


def create_run(store: Tracking, *, run_name: str, tags: dict[str, Any], params: dict[str, str], doing: str) -> str:
    """Create a run owned by this process and log its ``params``; a server that does not answer stops here
    with one message (``doing``: what did not happen, e.g. "stage 'sft' did not start")."""
    from mlflow.entities import Param

    try:
        experiment = store.experiment_id()
        run_id = store.client.create_run(experiment, run_name=run_name, tags={**tags, **owner_tags()}).info.run_id
        log_batched(store.client, run_id, params=[Param(k, v) for k, v in params.items()])
        return run_id
    except Exception as err:
        if not is_outage(err):
            raise
        raise TrackingUnavailable(f"the MLflow tracking server {store.uri} does not answer ({outage_reason(err)}): {doing}; "
                                  "nothing was lost. Start the server (or point tracking.uri at one that runs) and run "
                                  "again") from None


def close_stale_runs(store: Tracking, *, skip: set[str] | frozenset[str] = frozenset()) -> list[Run]:
    """Mark KILLED every RUNNING run of this host whose owner process has ended (but those in ``skip``); return them."""
    experiment = store.client.get_experiment_by_name(store.experiment)
    if experiment is None:
        return []
    host = socket.gethostname()
    running = store.client.search_runs([experiment.experiment_id], max_results=1000,
                                       filter_string=f"attributes.status = 'RUNNING' and tags.`{OWNER_HOST}` = '{host}'")
    closed = []
    for run in running:
        pid = run.data.tags.get(OWNER_PID, "")
        if run.info.run_id in skip or not pid.isdigit() or process_alive(int(pid)):
            continue
        log_tags(store.client, run.info.run_id, {CLOSED_BY: f"a later run: process {pid} on {host} had ended without closing it"})
        store.client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run)
    return closed
