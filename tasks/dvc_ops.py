"""DVC as the pipeline's engine: the stages of ``dvc.yaml`` and their order, ``dvc repro -s``, push and pull.

What the pipeline is (stages, their order, params and outputs) is read through DVC's own API
(``Repo.index``, the plan ``dvc repro`` follows, ``dvc.api.params_show``). Work that changes
the workspace (repro, push, pull, checkout) goes through DVC's CLI in a subprocess in the
workspace: robust where the in-process API is not (it resolves stage names against the current
directory), and one DVC call at a time per workspace (DVC holds a repo lock).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STAGE_STARTED_ENV = "RLHF_STAGE_STARTED_FILE"
"""Set by :func:`repro_stage` for the stage's command, which touches the file as it starts
(:func:`mark_stage_started`): so a stage "ran" exactly when DVC executed its command, and not
when DVC found it up to date or restored its outputs from the run-cache."""
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
    """True when DVC executed the stage's command; False when it found the stage up to date or
    restored its outputs from the run-cache."""
    seconds: float


def _pipeline_stages(root: Path) -> list[Any]:
    """The stages of ``root/dvc.yaml`` in the order ``dvc repro`` runs them (DVC's plan of its DAG)."""
    from dvc.repo import Repo
    from dvc.repo.reproduce import plan_repro

    dvcfile = (Path(root) / "dvc.yaml").resolve()
    with Repo(str(root)) as repo:
        return [s for s in plan_repro(repo.index.graph) if getattr(s, "name", None) and Path(s.dvcfile.path).resolve() == dvcfile]


def stage_order(root: Path) -> list[str]:
    """Stages of ``dvc.yaml`` in dependency order: the order ``dvc repro`` runs them."""
    return [stage.name for stage in _pipeline_stages(root)]


def always_changed_stages(root: Path) -> set[str]:
    """Stages DVC re-runs every time (``always_changed``): they read the world outside the repo (``ingest``)."""
    return {stage.name for stage in _pipeline_stages(root) if stage.always_changed}


def _stage(root: Path, name: str) -> Any:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:  # an absolute target: DVC resolves names against the current directory
        (stage,) = repo.stage.collect(f"{Path(root).resolve() / 'dvc.yaml'}:{name}")
        return stage


def stage_outputs(root: Path, name: str) -> list[Path]:
    """The data and model outputs of stage ``name`` (``outs``; not its metrics and plots)."""
    return [Path(out.fs_path) for out in _stage(root, name).outs if not out.metric and not out.plot]


def stage_params(root: Path, name: str) -> dict[str, Any]:
    """Only the ``params.yaml`` keys ``dvc.yaml`` lists for stage ``name``, as a nested dict (``dvc params``' view)."""
    import dvc.api

    return dvc.api.params_show(stages=[f"{Path(root).resolve() / 'dvc.yaml'}:{name}"], repo=str(root))


def dvc(root: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run one DVC command in ``root`` and capture its output."""
    proc = subprocess.run(["dvc", *args], cwd=root, env={**os.environ, **(env or {})}, text=True, capture_output=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`dvc {' '.join(args)}` failed in {root} (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc


def repro_stage(root: Path, stage: str, *, env: dict[str, str] | None = None, echo: Callable[[str], None] = print,
                force: bool = False) -> StageOutcome:
    """``dvc repro -s <stage>``, streaming its output line by line through ``echo``.

    Whether the stage ran is whether DVC executed its command (see :data:`STAGE_STARTED_ENV`).
    """
    started = time.perf_counter()
    cmd = ["dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    with tempfile.TemporaryDirectory(prefix="rlhf-stage-") as scratch:
        marker = Path(scratch) / "started"
        proc = subprocess.Popen(cmd, cwd=root, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {}),
                                                    STAGE_STARTED_ENV: str(marker)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        tail: list[str] = []
        last_bar = 0.0
        assert proc.stdout is not None
        for raw in proc.stdout:  # text mode splits on \r too: each progress-bar redraw is a line
            line = raw.rstrip("\n")
            if not line.strip():
                continue
            tail = (tail + [line])[-40:]
            if PROGRESS_BAR.search(line) and "100%" not in line:
                if time.monotonic() - last_bar < PROGRESS_EVERY_S:
                    continue  # a log line per redraw would drown the log: one every few seconds
                last_bar = time.monotonic()
            echo(line)
        returncode = proc.wait()
        ran = marker.exists()
    if returncode != 0:
        raise StageFailed(stage, returncode, tail)
    return StageOutcome(stage=stage, ran=ran, seconds=time.perf_counter() - started)


def mark_stage_started() -> None:
    """Called by a stage's command as it starts: tells :func:`repro_stage` that DVC executed it."""
    marker = os.environ.get(STAGE_STARTED_ENV)
    if marker:
        Path(marker).touch()


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
