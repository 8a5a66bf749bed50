"""DVC as the pipeline's engine: the stages of ``dvc.yaml`` and their order, ``dvc repro -s``, push and pull.

What the pipeline is (stages, their order, params and outputs) is read through DVC's own API
(``Repo.index``, the plan ``dvc repro`` follows, a stage's params dependencies). Work that changes
the workspace (repro, push, pull, checkout) goes through DVC's CLI in a subprocess in the
workspace: robust where the in-process API is not (it resolves stage names against the current
directory), and one DVC call at a time per workspace (DVC holds a repo lock).

``dvc repro`` runs in a process group of its own (``tasks.process_groups``): an interrupt of the
caller stops it with SIGINT (the stage marks its MLflow run KILLED), and DVC's hints that ask the
user to do what the pipeline does itself (``git add``, ``dvc push``) are left out of its output.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_core.errors import UserFacingError

STAGE_STARTED_ENV = "RLHF_STAGE_STARTED_FILE"
"""Set by :func:`repro_stage` for the stage's command, which touches the file as it starts
(:func:`mark_stage_started`): so a stage "ran" exactly when DVC executed its command, and not
when DVC found it up to date or restored its outputs from the run-cache."""
PROGRESS_BAR = re.compile(r"\d+%\|")
PROGRESS_EVERY_S = 10.0
CHATTER = re.compile(r"^(To track the changes with git, run:|git add |To enable auto staging, run:|"
                     r"dvc config core\.autostage true|Use `dvc push` to send your updates to remote storage)")
"""DVC's hints to do what the pipeline does itself (it pushes; the user commits dvc.lock when they choose)."""


class StageFailed(UserFacingError):
    """A stage's command failed; the message says why (the stage's own one-line reason when it gave one),
    what is intact and how to restore what is not."""

    def __init__(self, stage: str, returncode: int, tail: list[str], *, had_outputs: bool = False) -> None:
        self.stage = stage
        self.returncode = returncode
        self.tail = tail
        prefix = f"[rlhf] stage '{stage}' failed: "
        reason = next((line[len(prefix):] for line in reversed(tail) if line.startswith(prefix)), None)
        if reason is None:  # a crash, not a reported failure: its last words (a traceback's are in the log above), else DVC's
            words = [line.strip() for line in tail if line.strip() and not line.startswith("> ")]
            own = [word for word in words if not word.startswith("ERROR: failed to reproduce")]
            reason = (own or [word.removeprefix("ERROR: ") for word in words] or [f"exit {returncode}, no output"])[-1]
        restore = (f" DVC removed {stage}'s previous outputs from the workspace before it ran: they are in the DVC cache, "
                   f"`dvc checkout {stage}` restores them." if had_outputs else "")
        super().__init__(f"stage '{stage}' failed: {reason}\nIntact: params.yaml, the outputs of the stages before it and the "
                         f"DVC cache.{restore} Fix the cause and run again: finished stages are skipped. The stage's full "
                         "output is in its log above and in the Prefect UI.")


class PushFailed(UserFacingError):
    """``dvc push`` failed; every output is still in the local DVC cache."""


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
    """Only the ``params.yaml`` keys ``dvc.yaml`` lists for stage ``name``, as a nested dict (``dvc params``' view), read
    through the stage's own params dependencies (one stage collected: ``dvc.api.params_show`` builds the whole index)."""
    from dvc.dependency.param import ParamsDependency

    nested: dict[str, Any] = {}
    for dep in _stage(root, name).deps:
        if isinstance(dep, ParamsDependency):
            for key, value in dep.read_params().items():  # dotted keys, e.g. ``sft.max_steps``
                *groups, leaf = key.split(".")
                node = nested
                for group in groups:
                    node = node.setdefault(group, {})
                node[leaf] = value
    return nested


def dvc(root: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run one DVC command in ``root`` and capture its output."""
    proc = subprocess.run(dvc_command(*args, env=env), cwd=root, env={**os.environ, **(env or {})}, text=True,
                          capture_output=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`dvc {' '.join(args)}` failed in {root} (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc


def dvc_command(*args: str, env: dict[str, str] | None = None) -> list[str]:
    """The command line of ``dvc *args``: run by the flow's stage host when ``env`` (or this process) names one that has
    finished its imports (``python -m dvc`` forked there starts faster than a fresh ``dvc``; while the host still imports,
    a fresh one starts sooner than the host could answer)."""
    from tasks.stage_host import HOST_ENV, is_ready

    host = (env or {}).get(HOST_ENV) or os.environ.get(HOST_ENV)
    if not is_ready(host):
        return ["dvc", *args]
    return [sys.executable, "-m", "tasks.stage_host", "run", "dvc", *args]


def _lock_has(root: Path, stage: str) -> bool:
    """Whether ``dvc.lock`` records outputs of ``stage`` (from an earlier run)."""
    import yaml

    lock = Path(root) / "dvc.lock"
    return lock.is_file() and bool(((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}).get(stage, {}).get("outs"))


def repro_stage(root: Path, stage: str, *, env: dict[str, str] | None = None, echo: Callable[[str], None] = print,
                force: bool = False) -> StageOutcome:
    """``dvc repro -s <stage>``, streaming its output line by line through ``echo``.

    Whether the stage ran is whether DVC executed its command (see :data:`STAGE_STARTED_ENV`). An
    interrupt (Ctrl-C) or any other exception while it runs stops it (:func:`tasks.process_groups.stop_group`)
    before propagating.
    """
    from tasks.process_groups import forget, remember, stop_group
    from tasks.workspace import state_dir

    started = time.perf_counter()
    cmd = dvc_command("repro", "--single-item", stage, *(["--force"] if force else []), env=env)
    had_outputs = _lock_has(root, stage)
    tail: list[str] = []
    with tempfile.TemporaryDirectory(prefix="rlhf-stage-") as scratch:
        marker = Path(scratch) / "started"
        proc = subprocess.Popen(cmd, cwd=root, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {}),
                                                    STAGE_STARTED_ENV: str(marker)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        record = remember(Path((env or {}).get("RLHF_STATE_DIR") or state_dir(root)), proc.pid, "dvc repro")
        last_bar = [0.0]

        def drain() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:  # text mode splits on \r too: each progress-bar redraw is a line
                line = raw.rstrip("\n")
                if not line.strip() or CHATTER.match(line.strip()):
                    continue
                tail[:] = (tail + [line])[-40:]
                if PROGRESS_BAR.search(line) and "100%" not in line:
                    if time.monotonic() - last_bar[0] < PROGRESS_EVERY_S:
                        continue  # a log line per redraw would drown the log: one every few seconds
                    last_bar[0] = time.monotonic()
                echo(line)

        try:
            drain()
            returncode = proc.wait()
        except BaseException:  # Ctrl-C, a task timeout: the stage ends too (and says so in its output)
            stop_group(proc.pid, child=proc, drain=drain)
            raise
        finally:
            forget(record)
        ran = marker.exists()
    if returncode != 0:
        raise StageFailed(stage, returncode, tail, had_outputs=had_outputs)
    return StageOutcome(stage=stage, ran=ran, seconds=time.perf_counter() - started)


def mark_stage_started() -> None:
    """Called by a stage's command as it starts: tells :func:`repro_stage` that DVC executed it."""
    marker = os.environ.get(STAGE_STARTED_ENV)
    if marker:
        Path(marker).touch()


def remote_config(root: Path, name: str | None = None) -> tuple[str, dict[str, Any]] | None:
    """The DVC remote ``name`` (default: the repo's default remote) and its settings, read with DVC's own API:
    ``.dvc/config`` merged with ``config.local`` and the user's and system's configs, a local ``url`` made
    absolute (DVC keeps it relative to the config file). ``None`` when no name is given and no default is
    set; ``KeyError`` naming the remotes that exist when ``name`` is not one of them."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        config = repo.config
        name = name or config["core"].get("remote")
        if not name:
            return None
        remotes = config["remote"]
        if name not in remotes:
            raise KeyError(f"no DVC remote named '{name}' (remotes: {', '.join(remotes) or 'none'})")
        return name, dict(remotes[name])


def remote_url(workspace: Path) -> tuple[str, str] | None:
    """The workspace's default DVC remote (name, URL), a local path made absolute (it is relative to ``.dvc/``)."""
    found = remote_config(workspace)
    return (found[0], found[1]["url"]) if found else None


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
    """``dvc push`` (to ``remote`` or the default one); :class:`PushFailed` names the remote and DVC's reason."""
    args = ["push"] + (["-r", remote] if remote else [])
    proc = dvc(root, *args, check=False)
    if proc.returncode == 0:
        return proc.stdout.strip()
    errors = [line.removeprefix("ERROR: ").removeprefix("unexpected error - ").strip()
              for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("ERROR: ")]
    name, url = (remote, dvc(root, "config", f"remote.{remote}.url", check=False).stdout.strip()) if remote else \
        (remote_url(root) or ("(none)", "no default remote"))
    raise PushFailed(f"pushing the outputs to the DVC remote '{name}' ({url}) failed: {errors[0] if errors else 'exit ' + str(proc.returncode)}. "
                     "Every output is in the local DVC cache: `dvc push` sends them once the remote answers.")


def status_clean(root: Path) -> bool:
    """True when ``dvc status`` has nothing to do but the ``always_changed`` stages (``ingest``),
    which it always lists: their outputs are checked like any other's."""
    import json

    out = dvc(root, "status", "--json").stdout.strip()
    changes = json.loads(out) if out else {}
    return all(entry == ["always changed"] for entry in changes.values())
