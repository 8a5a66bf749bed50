"""One run at a time in a workspace (DVC's workspace model); isolated runs (``--ref``) are not limited.

Two ``rlhf run`` in the same folder would write the same ``params.yaml`` (the second run trains with the
first one's ``--set`` values too) and the same outputs, and one of them fails half-way on DVC's own lock
with a message about ``.dvc/tmp/rwlock``. So a workspace run holds an exclusive ``flock`` on
``<state>/workspace-run.lock`` for its whole length, and a second one stops before it starts anything,
naming the run that holds it. The kernel releases the lock when its process ends, however it ends
(``kill -9`` included): a stale lock file never blocks the next run.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rlhf_core.errors import UserFacingError
from tasks.workspace import state_dir

LOCK_FILE = "workspace-run.lock"
_held: dict[str, int] = {}
"""Locks this process holds, with their depth: ``rlhf run`` takes it before its preflight, the flow again inside."""


class WorkspaceBusy(UserFacingError):
    """Another run holds the workspace."""


@contextmanager
def workspace_run_lock(root: Path, what: str = "rlhf run") -> Iterator[None]:
    """Hold ``root``'s run lock for the block (re-entrant within a process).

    Raises:
        WorkspaceBusy: another process holds it; the message names its pid, command and start.
    """
    path = state_dir(root) / LOCK_FILE
    key = str(path)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by the processes the run starts (PEP 446)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WorkspaceBusy(
            f"another run is using the workspace {root} ({_holder(path)}): two runs in one workspace would write the same "
            "params.yaml and outputs. Wait for it to end, or run this one isolated from a commit with --ref HEAD "
            "(isolated runs can run at once)"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "command": what, "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        _held[key] = 1
        yield
    finally:
        _held.pop(key, None)
        os.close(fd)  # releases the lock


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"{holder['command']}, process {holder['pid']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its process is starting"
