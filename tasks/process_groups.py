"""Processes a run starts in a process group of their own: stopped on an interrupt, and by the next run if this one was killed.

``rlhf run`` starts long-lived children: the temporary Prefect server and, per stage, ``dvc repro``
with the stage's command. Each runs in its own process group (session), so a Ctrl-C in the
terminal reaches only ``rlhf``, which then stops them in order (:func:`stop_group`: SIGINT, so a
stage marks its run KILLED, then SIGKILL after a grace period) and still has its Prefect server to
record the interrupt on. Each group is remembered in ``<state>/processes/<pgid>.json`` (``state``:
:func:`tasks.workspace.state_dir`) with the pid of the run that owns it; a run killed outright
(``kill -9``) cannot stop its children, so the next run does (:func:`stop_orphans`) before it starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

GRACE_S = 20.0
"""How long a group may take to end after SIGINT (a stage closes its MLflow run) before SIGKILL."""


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def remember(state: Path, pgid: int, what: str) -> Path:
    """Record group ``pgid`` (led by a process whose command line contains ``what``) as owned by this process,
    in the state folder ``state`` (:func:`tasks.workspace.state_dir`)."""
    record = Path(state) / "processes" / f"{pgid}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"pgid": pgid, "owner": os.getpid(), "what": what}) + "\n")
    return record


def forget(record: Path) -> None:
    record.unlink(missing_ok=True)


def _kill(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def stop_group(pgid: int, *, grace_s: float = GRACE_S, first: int = signal.SIGINT, child: subprocess.Popen | None = None,
               drain: Callable[[], None] | None = None) -> None:
    """Send ``first`` to group ``pgid`` and let it end for ``grace_s`` seconds (reading its output through
    ``drain`` until it closes, reaping its leader ``child`` when it is ours), then SIGKILL what is left."""
    try:
        os.killpg(pgid, first)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    killer = threading.Timer(grace_s, _kill, (pgid,))  # ends a drain or a wait that would outlast the grace period
    killer.daemon = True
    killer.start()
    try:
        if drain is not None:
            drain()
        if child is not None:
            child.wait()
        while _alive(pgid) and time.monotonic() < deadline:  # members that are not our children
            time.sleep(0.1)
    finally:
        killer.cancel()
    _kill(pgid)


def stop_orphans(state: Path, echo: Callable[[str], None] = print) -> list[str]:
    """Stop the groups that runs which have ended (killed) left behind (recorded in ``state``); returns what was stopped."""
    from tasks.tracking.lifecycle import process_alive

    stopped = []
    folder = Path(state) / "processes"
    for record in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        entry = json.loads(record.read_text())
        if process_alive(entry["owner"]):
            continue  # its run still runs (a concurrent run of this workspace)
        if _alive(entry["pgid"]) and entry["what"] in _cmdline(entry["pgid"]):
            echo(f"stopping {entry['what']} (process group {entry['pgid']}) left behind by run process {entry['owner']}, "
                 "which was killed")
            stop_group(entry["pgid"])
            stopped.append(entry["what"])
        forget(record)
    return stopped
