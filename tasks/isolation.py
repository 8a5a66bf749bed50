"""Isolated pipeline runs: a fresh checkout of a git ref per run, sharing the DVC cache.

A scheduled or on-demand deployment must not inherit what an earlier run left in a workspace
(an override in ``params.yaml``, a half-written output), and two runs at once must not share
files. So each such run gets a git worktree of the ref under ``<workspace>/.rlhf/runs/<name>``
(ignored by git and DVC), whose ``.dvc/config.local`` points at the workspace's DVC cache and
run-cache and its default remote: outputs of unchanged stages are restored from there by DVC
(``Stage ... is cached - skipping run``), not recomputed. Tracking goes to the workspace's
MLflow store, and ingest remembers sources in the workspace's ``.rlhf/`` (``tasks.sources``).
The worktree is removed after a successful run and kept, for inspection, after a failure.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tasks import dvc_ops

RUNS_DIR = Path(".rlhf") / "runs"


@dataclass
class Checkout:
    root: Path
    """Where the stages run."""
    commit: str
    env: dict[str, str]
    """Environment for the stage processes (where they run, the workspace's ingest state); the flow adds the
    workspace's tracking URI once the run's overrides are applied (``flows.alignment.run_tracking``)."""


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, text=True, capture_output=True)
    if done.returncode != 0:
        raise ValueError(f"`git {' '.join(args)}` failed in {cwd}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


@contextmanager
def isolated_checkout(workspace: Path, ref: str, name: str, *, echo: Callable[[str], None] = print) -> Iterator[Checkout]:
    """A worktree of ``ref`` (a branch, tag or commit of ``workspace``'s repo) for one run named ``name``."""
    workspace = workspace.resolve()
    commit = _git(workspace, "rev-parse", "--verify", f"{ref}^{{commit}}")
    root = workspace / RUNS_DIR / re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
    echo(f"isolated run: {ref} ({commit[:12]}) checked out in {root}")
    _git(workspace, "worktree", "add", "--detach", "--force", str(root), commit)
    try:
        dvc_ops.share_cache_and_remote(workspace, root)
        # Outputs the ref's dvc.lock records come from the shared cache; missing ones are rebuilt or restored later.
        dvc_ops.dvc(root, "checkout", check=False)
        yield Checkout(root=root, commit=commit, env={
            "RLHF_WORKSPACE": str(root),  # stages read and write here, not in the worker's workspace
            "RLHF_STATE_DIR": str(workspace / ".rlhf"),
        })
    except BaseException:
        echo(f"the run's checkout is kept for inspection: {root} (remove it with `git worktree remove --force {root}`)")
        raise
    _git(workspace, "worktree", "remove", "--force", str(root))
