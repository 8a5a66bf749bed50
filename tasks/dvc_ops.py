"""DVC as the pipeline's engine: stage order from ``dvc.yaml``, ``dvc repro -s``, push and pull.

DVC is driven through its CLI in a subprocess in the workspace (robust where the in-process
API is not, and one DVC call at a time per workspace: DVC holds a repo lock).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

SKIP_MARKERS = ("didn't change, skipping", "is cached - skipping run")
"""DVC's words for a stage it did not run: up to date, or restored from the run-cache."""
PROGRESS_BAR = re.compile(r"\d+%\|")
PROGRESS_EVERY_S = 10.0


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, tail: list[str]) -> None:
        self.stage = stage
        self.returncode = returncode
        self.tail = tail
        last = "\n".join(f"    {line}" for line in tail[-15:])
        super().__init__(
            f"stage '{stage}' failed (exit {returncode}). Outputs of earlier stages and of earlier runs "
            f"are intact; fix the cause and run again (finished stages are skipped).\n  last output:\n{last}"
        )


@dataclass
class StageOutcome:
    stage: str
    ran: bool
    """False when DVC found the stage up to date and skipped it."""
    seconds: float


def _paths(entries: list) -> list[str]:
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def _stages(root: Path) -> dict:
    return (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})


def always_changed_stages(root: Path) -> set[str]:
    """Stages DVC re-runs every time (``always_changed``): they read the world outside the repo (``ingest``)."""
    return {name for name, stage in _stages(root).items() if stage.get("always_changed")}


def stage_order(root: Path) -> list[str]:
    """Stages of ``dvc.yaml`` in dependency order (ties keep file order)."""
    stages = _stages(root)
    produces = {name: _paths(s.get("outs")) + _paths(s.get("metrics")) + _paths(s.get("plots")) for name, s in stages.items()}

    def upstream(name: str) -> set[str]:
        deps = _paths(stages[name].get("deps"))
        return {
            other for other, outs in produces.items() if other != name
            and any(d == o or d.startswith(o.rstrip("/") + "/") or o.startswith(d.rstrip("/") + "/") for d in deps for o in outs)
        }

    order: list[str] = []
    pending = list(stages)
    while pending:
        ready = [s for s in pending if upstream(s) <= set(order)]
        if not ready:
            raise ValueError(f"dvc.yaml has a dependency cycle among {pending}")
        order.append(ready[0])
        pending.remove(ready[0])
    return order


def dvc(root: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run one DVC command in ``root`` and capture its output."""
    proc = subprocess.run(["dvc", *args], cwd=root, env={**os.environ, **(env or {})}, text=True, capture_output=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`dvc {' '.join(args)}` failed in {root} (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc


def repro_stage(root: Path, stage: str, *, env: dict[str, str] | None = None, echo: Callable[[str], None] = print,
                force: bool = False) -> StageOutcome:
    """``dvc repro -s <stage>``, streaming its output line by line through ``echo``."""
    started = time.perf_counter()
    cmd = ["dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    proc = subprocess.Popen(cmd, cwd=root, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: list[str] = []
    skipped = False
    last_bar = 0.0
    assert proc.stdout is not None
    for raw in proc.stdout:  # text mode splits on \r too: each progress-bar redraw is a line
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        skipped = skipped or any(marker in line for marker in SKIP_MARKERS)
        tail = (tail + [line])[-40:]
        if PROGRESS_BAR.search(line) and "100%" not in line:
            if time.monotonic() - last_bar < PROGRESS_EVERY_S:
                continue  # a log line per redraw would drown the log: one every few seconds
            last_bar = time.monotonic()
        echo(line)
    returncode = proc.wait()
    if returncode != 0:
        raise StageFailed(stage, returncode, tail)
    return StageOutcome(stage=stage, ran=not skipped, seconds=time.perf_counter() - started)


def remote_url(workspace: Path) -> tuple[str, str] | None:
    """The workspace's default DVC remote (name, URL), a local path made absolute (it is relative to ``.dvc/``)."""
    name = dvc(workspace, "remote", "default", check=False).stdout.strip()
    if not name:
        return None
    url = dvc(workspace, "config", f"remote.{name}.url").stdout.strip()
    if "://" not in url and not Path(url).is_absolute():
        url = str((workspace / ".dvc" / url).resolve())
    return name, url


def share_cache_and_remote(workspace: Path, checkout: Path, *, share_cache: bool = True) -> None:
    """Point another checkout of the repo (a git worktree) at ``workspace``'s default DVC remote and
    (``share_cache``) its DVC cache with the run-cache, in the checkout's ``.dvc/config.local``."""
    if share_cache:
        cache = dvc(workspace, "cache", "dir").stdout.strip()
        cache = str((workspace / cache).resolve()) if not Path(cache).is_absolute() else cache
        dvc(checkout, "cache", "dir", "--local", cache)
    remote = remote_url(workspace)
    if remote is not None:
        dvc(checkout, "remote", "modify", "--local", remote[0], "url", remote[1])


def push(root: Path, remote: str | None = None) -> str:
    args = ["push"] + (["-r", remote] if remote else [])
    return dvc(root, *args).stdout.strip()


def status_clean(root: Path) -> bool:
    """True when ``dvc status`` has nothing to do but the ``always_changed`` stages (``ingest``),
    which it always lists: their outputs are checked like any other's."""
    import json

    out = dvc(root, "status", "--json").stdout.strip()
    changes = json.loads(out) if out else {}
    return all(entry == ["always changed"] for entry in changes.values())
