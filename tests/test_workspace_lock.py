"""One workspace-mode run at a time in a folder: a second `rlhf run` stops before it starts anything, naming the run
that holds the workspace; the lock goes with its process however it ends (kill -9 included), and the flow inside
`rlhf run` takes it again without blocking itself."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.workspace_lock import LOCK_FILE, WorkspaceBusy, workspace_run_lock

ROOT = Path(__file__).resolve().parents[1]
HOLD = """
import sys
from pathlib import Path
from tasks.workspace_lock import workspace_run_lock
with workspace_run_lock(Path(sys.argv[1]), "rlhf run"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin or kills this process
"""


def _holder(ws: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(ws)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "RLHF_STATE_DIR": ""})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_workspace_is_refused_with_its_holder_and_freed_when_the_holder_is_killed(tmp_path, monkeypatch):
    monkeypatch.delenv("RLHF_STATE_DIR", raising=False)
    holder = _holder(tmp_path)
    try:
        busy = rf"another run is using the workspace {tmp_path} \(rlhf run, process {holder.pid}, started .*\).*--ref HEAD"
        with pytest.raises(WorkspaceBusy, match=busy), workspace_run_lock(tmp_path):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".rlhf" / LOCK_FILE).exists()  # the file stays; the kernel released the lock with the process
    with workspace_run_lock(tmp_path, "first"):
        with workspace_run_lock(tmp_path, "the flow inside it"):  # re-entrant in one process
            pass
        assert f'"pid": {os.getpid()}' in (tmp_path / ".rlhf" / LOCK_FILE).read_text()
    holder = _holder(tmp_path)  # released again after the outer block
    holder.communicate("")
    assert holder.returncode == 0


def test_rlhf_run_in_a_busy_workspace_stops_before_starting_anything(tmp_path, monkeypatch):
    monkeypatch.delenv("RLHF_STATE_DIR", raising=False)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_text()
    holder = _holder(tmp_path)
    try:
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "-w", str(tmp_path), "--set", "dpo.beta=0.3"],
                              capture_output=True, text=True, cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    finally:
        holder.communicate("")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"another run is using the workspace {tmp_path} (rlhf run, process {holder.pid}" in proc.stderr
    assert "Traceback" not in proc.stderr and (tmp_path / "params.yaml").read_text() == before
    assert {p.name for p in tmp_path.iterdir()} == {"params.yaml", ".rlhf"}  # no Prefect home, no store, no stage
