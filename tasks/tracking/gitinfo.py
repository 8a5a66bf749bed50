"""The git state a run records: commit, dirty flag, branch."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

UNKNOWN = "unknown"


def git_info(project_dir: Path) -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool, "branch": name}`` of the git repo at ``project_dir``.

    ``dirty`` means tracked files differ from HEAD (untracked files do not count: DVC outputs
    and caches are ignored or untracked). A detached HEAD gives branch ``"detached"``.
    Without git, or outside a repo, every value is ``"unknown"``.
    """

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=project_dir, capture_output=True, text=True, timeout=30, check=True)
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return {"commit": UNKNOWN, "dirty": UNKNOWN, "branch": UNKNOWN}
    return {"commit": commit, "dirty": dirty, "branch": "detached" if branch == "HEAD" else branch}


def git_tags(project_dir: Path) -> dict[str, str]:
    """Run tags of the git state: ``git.commit``, ``git.dirty``, ``git.branch`` (and MLflow's own
    ``mlflow.source.git.commit``, shown in its UI, when the commit is known)."""
    git = git_info(project_dir)
    tags = {"git.commit": str(git["commit"]), "git.dirty": str(git["dirty"]), "git.branch": str(git["branch"])}
    if git["commit"] != UNKNOWN:
        tags["mlflow.source.git.commit"] = git["commit"]
    return tags
