"""Runs pipeline stages one after another in every process of one ``accelerate launch`` (``tests/test_multiprocess.py``).

``accelerate launch ... -m tests.multiprocess_driver PLAN.json`` runs each job of the plan as ``python -m
tasks.<stage>`` does (``tasks.stage_main.stage_main``: rank 0 tracks and saves), in the job's workspace. One
launch serves several stages: starting processes is what costs most here.

A job may be stopped right after it saved the checkpoint of step (update) ``stop_after``, in every process:

- ``"stop": "sigterm"``: each process sends itself SIGTERM, as torchrun passes a SIGTERM or SIGINT of the
  launcher on to its workers; the stage ends with exit code 130 and the next job runs;
- ``"stop": "pause"``: each process writes ``paused.<rank>`` and sleeps until the test kills the launch.

Per process it writes to the plan's ``report_dir`` (outside every workspace) ``pid.<rank>`` as it starts and
``rank<rank>.json`` at the end: what it created, wrote, renamed or removed in a workspace outside ``checkpoints/``
and which SQLite databases (MLflow's store) it opened, as a Python audit hook saw them.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

PAUSE_S = 600
WRITE_EVENTS = ("os.mkdir", "os.remove", "os.rmdir", "os.rename", "os.replace", "os.truncate", "shutil.rmtree")


def _opens_for_writing(args: tuple) -> bool:
    """Whether an ``open`` audit event (path, mode, flags) can write."""
    path, mode, flags = args
    if mode is not None:
        return any(c in str(mode) for c in "wax+")
    return isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))


def record_writes(roots: list[Path], into: list[str]) -> None:
    """Append to ``into`` what this process writes under ``roots`` (outside their ``checkpoints/``) or opens as SQLite."""
    roots = [r.resolve() for r in roots]

    def in_workspace(path: object) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False
        full = Path(os.fsdecode(path)).resolve()
        return any(full.is_relative_to(r) and not full.is_relative_to(r / "checkpoints") for r in roots)

    def hook(event: str, args: tuple) -> None:
        if event == "sqlite3.connect":
            into.append(f"{event} {args[0]}")
        elif (event == "open" and _opens_for_writing(args)) or event in WRITE_EVENTS:
            paths = args[:2] if event in ("os.rename", "os.replace") else args[:1]
            into.extend(f"{event} {p}" for p in paths if in_workspace(p))

    sys.addaudithook(hook)


def stop_after(stage: str, step: int, how: str, report_dir: Path, rank: int) -> None:
    """Stop every process right after the checkpoint of ``step`` (``update`` for PPO/GRPO) is saved."""

    def stop() -> None:
        if how == "sigterm":
            signal.raise_signal(signal.SIGTERM)
        (report_dir / f"paused.{rank}").write_text(str(step))
        time.sleep(PAUSE_S)

    if stage in ("ppo", "grpo"):
        import rlhf_core.trainers.online as online

        save = online.save_checkpoint

        def save_then_stop(accelerator, state):
            folder = save(accelerator, state)
            if state.update == step:
                stop()
            return folder

        online.save_checkpoint = save_then_stop
    else:
        from transformers import Trainer

        save_trainer = Trainer._save_checkpoint

        def save_trainer_then_stop(self, *args, **kwargs):
            save_trainer(self, *args, **kwargs)
            if self.state.global_step == step:
                stop()

        Trainer._save_checkpoint = save_trainer_then_stop


def main(plan_file: str) -> None:
    import importlib

    from tasks.stage_main import stage_main

    plan = json.loads(Path(plan_file).read_text())
    report_dir = Path(plan["report_dir"])
    rank = int(os.environ["RANK"])
    (report_dir / f"pid.{rank}").write_text(str(os.getpid()))
    writes: list[str] = []
    record_writes([Path(job["workspace"]) for job in plan["jobs"]], writes)
    for job in plan["jobs"]:
        if "stop_after" in job:
            stop_after(job["stage"], job["stop_after"], job["stop"], report_dir, rank)
        os.environ["RLHF_WORKSPACE"] = job["workspace"]
        try:
            stage_main(job["stage"], importlib.import_module(f"tasks.{job['stage']}").run)
        except SystemExit as stopped:  # a stage stopped on purpose ends with 130; anything else fails the launch
            if not (job.get("stop") == "sigterm" and stopped.code == 130):
                raise
    (report_dir / f"rank{rank}.json").write_text(json.dumps({"pid": os.getpid(), "writes": writes}))


if __name__ == "__main__":
    main(sys.argv[1])
