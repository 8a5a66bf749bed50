"""Rebuild a past pipeline run from what its parent MLflow run logged, and check it matches.

From the run: the git commit, ``params.yaml``, ``dvc.lock`` and ``metrics/*.json``. The commit
is checked out in a separate git worktree (the user's workspace is untouched), the logged
params and lock are put in place, and then either

- (default) the outputs are pulled from the DVC remote and ``dvc status`` must be clean: every
  output is byte-identical (by hash) to what the run produced; or
- (``recompute=True``) every stage is recomputed from scratch with ``dvc repro --force``.

Then each logged metric is compared with the rebuilt one. Timings are reported, not compared.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_core.metrics import COMPUTE_SECONDS
from tasks import dvc_ops
from tasks.stage_host import hosted

TIMING_KEYS = ("seconds", COMPUTE_SECONDS)
DECISIONS = ("promote",)  # decided against the registry of that day: reported as logged, not re-decided


@dataclass
class MetricCheck:
    name: str
    logged: float | None
    reproduced: float | None
    status: str  # "match" | "differs" | "missing" | "timing"


@dataclass
class ReproduceReport:
    run_id: str
    commit: str
    worktree: Path
    mode: str
    outputs_match_lock: bool
    checks: list[MetricCheck] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        return self.outputs_match_lock and all(c.status in ("match", "timing") for c in self.checks)


def compare_metrics(logged: dict[str, float], reproduced: dict[str, float], *, rel_tol: float = 0.0) -> list[MetricCheck]:
    checks = []
    for name in sorted(set(logged) | set(reproduced)):
        a, b = logged.get(name), reproduced.get(name)
        if any(part.startswith(TIMING_KEYS) for part in name.split("/")):  # e.g. prepare/seconds/data
            status = "timing"
        elif a is None or b is None:
            status = "missing"
        elif a == b or math.isclose(a, b, rel_tol=rel_tol, abs_tol=0.0):
            status = "match"
        else:
            status = "differs"
        checks.append(MetricCheck(name, a, b, status))
    return checks


def lock_out_hashes(lock: Path) -> dict[str, str]:
    """{output path: md5} of the data and model outputs in a ``dvc.lock``. Metrics, plots and reports
    are left out: they carry timings and rendering dates, and metrics are compared value by value."""
    import yaml

    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {
        out["path"]: out.get("md5", "")
        for entry in stages.values() for out in entry.get("outs", [])
        if not out["path"].startswith(("metrics/", "plots/", "reports/"))
    }


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, text=True, capture_output=True).stdout.strip()


def reproduce(workspace: Path, run_id: str, *, recompute: bool = False, tracking: dict[str, Any] | None = None,
              worktree: Path | None = None, echo=print) -> ReproduceReport:
    from tasks.parent_run import download_run_record, metrics_dir_values

    workspace = workspace.resolve()
    record_dir = Path(tempfile.mkdtemp(prefix="rlhf-record-"))
    record = download_run_record(workspace, tracking, run_id, record_dir)
    commit = record["commit"]
    if not commit or commit == "unknown":
        raise ValueError(f"run {run_id} has no git commit tag: it cannot be rebuilt")
    worktree = worktree or Path(tempfile.mkdtemp(prefix=f"rlhf-reproduce-{run_id[:8]}-"))
    if worktree.exists():
        shutil.rmtree(worktree)
    echo(f"[reproduce] checking out {commit[:12]} in {worktree}")
    _git(workspace, "worktree", "add", "--detach", str(worktree), commit)
    shutil.copy(record["params"], worktree / "params.yaml")
    shutil.copy(record["lock"], worktree / "dvc.lock")
    # The same remote (also when named by a relative path); a cache of its own, so outputs come from the remote.
    dvc_ops.share_cache_and_remote(workspace, worktree, share_cache=False)
    if recompute:
        echo("[reproduce] recomputing every stage (dvc repro --force)")
        # Stage runs of the rebuild are tracked in the worktree's own MLflow store, apart from the original.
        env = {"RLHF_WORKSPACE": str(worktree), "MLFLOW_TRACKING_URI": f"sqlite:///{worktree / 'mlflow.db'}"}
        # Stages that read the outside world (ingest's sources) are restored as the run saw it, not re-run.
        outside = dvc_ops.always_changed_stages(worktree)
        with hosted({**os.environ, **env}) as host:  # one warm process starts every stage, as in `rlhf run`
            for stage in dvc_ops.stage_order(worktree):
                if stage in outside:
                    echo(f"[reproduce] restoring {stage}'s outputs (the run's data snapshot) from the DVC remote")
                    dvc_ops.dvc(worktree, "pull", stage)
                    continue
                if stage in DECISIONS:
                    continue
                dvc_ops.repro_stage(worktree, stage, force=True, echo=echo, env={**env, **host})
        outputs_match = lock_out_hashes(worktree / "dvc.lock") == lock_out_hashes(Path(record["lock"]))
        for path in record["metrics"]:
            if Path(path).stem in (*outside, *DECISIONS):
                shutil.copy(path, worktree / "metrics" / Path(path).name)
    else:
        echo("[reproduce] pulling outputs from the DVC remote")
        dvc_ops.dvc(worktree, "pull")
        (worktree / "metrics").mkdir(exist_ok=True)
        for path in record["metrics"]:
            shutil.copy(path, worktree / "metrics" / Path(path).name)
        outputs_match = dvc_ops.status_clean(worktree)
    checks = compare_metrics(record["logged_metrics"], metrics_dir_values(worktree / "metrics"))
    return ReproduceReport(run_id, commit, worktree, "recompute" if recompute else "pull", outputs_match, checks)
