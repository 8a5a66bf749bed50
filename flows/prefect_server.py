"""The temporary Prefect server of ``rlhf run``, started by the run itself in a process group of its own.

Prefect starts a temporary server on its own when no ``PREFECT_API_URL`` is set, but in the
terminal's process group: a Ctrl-C stops it together with the run, before the run can record the
interrupt on it (Prefect's client then retries a dead server for minutes), and a ``kill -9`` of
the run leaves it running. So ``rlhf run`` starts the same server (Prefect's app, as Prefect's
``SubprocessASGIServer`` runs it) itself: in its own group, remembered for the next run
(``tasks.process_groups``), stopped when the run ends however it ends.

A workspace's first server creates its SQLite database by running Prefect's 100-odd migrations,
6 s on 2 cores. The empty database it made (schema and block types, before any run) is kept per
Prefect version in the user's cache (:func:`database_template`) and copied into the next new
workspace instead: a fresh clone starts its server in half the time.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.process_groups import forget, remember, stop_group

APP = "prefect.server.api.server:create_app"
"""The app Prefect's own temporary server runs (``prefect.server.api.server.SubprocessASGIServer``)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the temporary Prefect server did not start within {timeout_s:.0f}s "
                       f"({'it exited' if proc.poll() is not None else 'no answer'}); its log: {log}")


def _drain_prefect_senders() -> None:
    """Send the logs and events Prefect still holds while the server is up (else they fail at exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=5)


def _sqlite_file() -> Path | None:
    """The file of Prefect's database when it is SQLite (the default, in ``$PREFECT_HOME``), else ``None``."""
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url.get_secret_value()
    prefix = "sqlite+aiosqlite:///"
    return Path(url[len(prefix):]) if url.startswith(prefix) and ":memory:" not in url else None


def database_template() -> Path:
    """Where the empty, migrated database of this Prefect version is kept: ``$XDG_CACHE_HOME`` (default ``~/.cache``)."""
    import prefect

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "rlhf-pipeline" / f"prefect-{prefect.__version__}.db"


def _seed_database(db: Path | None) -> bool:
    """Copy the template into a workspace that has no database yet; True when the server will have to create one."""
    if db is None or db.exists():
        return False
    template = database_template()
    if not template.is_file():
        return True
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, db)
    return False


def _keep_template(db: Path) -> None:
    """Save the database a server has just created (migrated, no run yet) as the template; best effort."""
    template = database_template()
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        partial = template.with_suffix(f".{os.getpid()}.partial")
        with sqlite3.connect(db) as source, sqlite3.connect(partial) as copy:
            source.backup(copy)  # consistent while the server has it open
        os.replace(partial, template)
    except (OSError, sqlite3.Error):
        pass


@contextmanager
def temporary_server(state: Path, echo: Callable[[str], None] = print) -> Iterator[str | None]:
    """Yield the API URL of a temporary Prefect server (its log in ``state``), or ``None`` when
    ``$PREFECT_API_URL`` names a server already; Prefect's settings point at it inside the block."""
    import prefect
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    if os.environ.get("PREFECT_API_URL"):
        yield None
        return
    port = _free_port()
    state.mkdir(parents=True, exist_ok=True)
    db = _sqlite_file()
    creates_database = _seed_database(db)
    log = state / "prefect-server.log"
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent), "--factory", APP,
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    with log.open("ab") as out:  # the same settings Prefect gives its own temporary server
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                                     "PREFECT__SERVER_FINAL": "1"})
    record = remember(state, proc.pid, "uvicorn")
    url = f"http://127.0.0.1:{port}/api"
    try:
        echo(f"temporary Prefect server on {url} (stopped when the run ends)")
        _wait_healthy(url, proc, float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()), log)
        if creates_database and db is not None:
            _keep_template(db)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                _drain_prefect_senders()
    finally:
        stop_group(proc.pid, first=signal.SIGTERM, grace_s=10.0, child=proc)
        forget(record)
