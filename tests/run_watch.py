"""Watch an `rlhf run` subprocess from outside, as a user at a terminal would: its output, and its MLflow and
Prefect records read straight from their SQLite files (read-only, while the run writes them)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil


def rlhf(ws: Path, command: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``rlhf <command> -w ws <args>`` started, with the tracking URI from params.yaml and a temporary Prefect server."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "PREFECT_API_URL": "", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "flows.cli", command, "-w", str(ws), *args], cwd=ws, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def query(db: Path, sql: str) -> list[tuple]:
    """Rows of ``sql`` in SQLite file ``db`` (none while the file or its tables do not exist yet)."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []


def runs(db: Path) -> dict[str, tuple[str, str]]:
    """{run name: (status, run id)} in an MLflow SQLite store (a name's newest run)."""
    return {name: (status, run_id) for name, status, run_id in query(db, "SELECT name, status, run_uuid FROM runs ORDER BY start_time")}


def status_of(db: Path, run_id: str) -> str | None:
    rows = query(db, f"SELECT status FROM runs WHERE run_uuid = '{run_id}'")
    return rows[0][0] if rows else None


def tag(db: Path, run_id: str, key: str) -> str | None:
    rows = query(db, f"SELECT value FROM tags WHERE run_uuid = '{run_id}' AND key = '{key}'")
    return rows[0][0] if rows else None


def parent_run(db: Path) -> tuple[str, str]:
    """(status, run id) of the store's only pipeline parent run."""
    (parent,) = [value for name, value in runs(db).items() if name.startswith("pipeline-")]
    return parent


def flow_run_states(ws: Path) -> list[str]:
    """State types of the Prefect flow runs on the workspace's temporary server, oldest first."""
    return [state for (state,) in query(ws / ".prefect" / "prefect.db", "SELECT state_type FROM flow_run ORDER BY created")]


def wait_for_stage_run(db: Path, proc: subprocess.Popen, stage: str, timeout_s: float = 300) -> None:
    """Return once ``stage``'s MLflow run is RUNNING (and a second more: well inside the stage)."""
    deadline = time.monotonic() + timeout_s
    while runs(db).get(stage, ("",))[0] != "RUNNING":
        assert proc.poll() is None, f"rlhf run ended early:\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"stage {stage} did not start within {timeout_s}s"
        time.sleep(0.2)
    time.sleep(1.0)


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def still_running(processes: list[psutil.Process]) -> list[str]:
    """The command lines of those of ``processes`` that still run (zombies have ended)."""
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(" ".join(p.cmdline()[:4]))
        except psutil.NoSuchProcess:
            pass
    return alive
