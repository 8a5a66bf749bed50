"""The entry point every stage shares (``python -m tasks.<stage>``, as ``dvc.yaml`` calls it).

Loads ``params.yaml``, opens the stage's MLflow run (nested under the pipeline's parent run
when ``$RLHF_PARENT_RUN_ID`` is set), runs the stage's pure ``run(params, ws, tracker)``,
logs its final metrics and the hashes of its outputs, and turns a user error (bad params,
bad data, failed validation, a tracking server that does not answer as it starts) into a
readable message and exit code 1 instead of a traceback, and Ctrl-C into exit code 130 (its
run marked KILLED). A tracking server that stops answering later does not fail the stage:
it finishes, and what it could not log waits for ``rlhf sync`` (``tasks.tracking.outage``).
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from typing import Any

from tasks.params import ParamsError, load_params
from tasks.workspace import Workspace

StageFn = Callable[[dict[str, Any], Workspace, Any], dict[str, Any]]


class StageError(RuntimeError):
    """A stage cannot go on; the message says why and what to fix."""


def limit_cpu_threads() -> int:
    """CPU threads for this stage's torch ops: ``$OMP_NUM_THREADS`` if set, else all cores but one.

    The spare core serves the processes beside the stage (Prefect and MLflow servers, DVC): with
    every core busy, torch's thread pool spins on barriers and small models slow down tenfold.
    """
    import os

    import torch

    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 2) - 1))
    torch.set_num_threads(threads)
    return threads


def redeliver_swallowed_interrupts() -> None:
    """Make Ctrl-C (the SIGINT ``rlhf`` sends a stage) always stop the stage.

    A ``KeyboardInterrupt`` raised while Python runs a weakref callback or a ``__del__`` (garbage
    collection in the middle of training) cannot propagate: Python prints it as "Exception ignored"
    with a traceback and training goes on until the caller's grace period ends in SIGKILL, before the
    stage could mark its MLflow run. Such an interrupt is delivered again to the main thread instead.
    """
    import _thread
    import threading

    default_hook = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            # From another thread, a moment later: raised in the main thread's own code, not in this hook.
            threading.Timer(0.05, _thread.interrupt_main).start()
            return
        default_hook(unraisable)

    sys.unraisablehook = hook


def stage_main(stage: str, run: StageFn, *, torch_threads: bool = True) -> None:
    """Run ``stage`` as a process; ``torch_threads=False`` for stages that never touch torch (no import cost)."""
    import datasets

    from rlhf_core.data.formats import DataFormatError
    from rlhf_core.data.loading import DataLoadError
    from rlhf_core.errors import UserFacingError
    from tasks.dvc_ops import mark_stage_started, stage_outputs, stage_params
    from tasks.launch import follow_launcher, is_main_process
    from tasks.tracking.stage_run import stage_run

    follow_launcher()  # a worker of `accelerate launch` stops with its launcher
    redeliver_swallowed_interrupts()
    if is_main_process():
        mark_stage_started()  # DVC executed this stage's command: it ran (not skipped, not restored)
    datasets.disable_progress_bars()  # per-map bars drown the training log in Prefect/CI output
    if torch_threads:
        limit_cpu_threads()
    # What is loaded by now lives as long as the process: the garbage collector's full passes leave it out instead
    # of scanning its ~800,000 objects (0.6 s a pass on 2 cores) each time a stage builds many lists of token ids.
    gc.freeze()
    ws = Workspace.here()
    started = time.perf_counter()
    try:
        params = load_params(ws.params_file)
        if not is_main_process():  # other ranks of `accelerate launch` train; rank 0 tracks and saves
            run(params, ws, None)
            return
        with stage_run(stage, stage_params(ws.root, stage), project_dir=ws.root, tracking=params.get("tracking")) as tracker:
            metrics = run(params, ws, tracker)
            tracker.log_metrics(metrics)  # non-numeric and non-finite values are skipped there
            tracker.log_output_hashes(stage_outputs(ws.root, stage), ws.root)
    except (ParamsError, DataFormatError, DataLoadError, UserFacingError, StageError) as err:
        print(f"\n[rlhf] stage '{stage}' failed: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"\n[rlhf] stage '{stage}' interrupted", file=sys.stderr)
        sys.exit(130)
    # A tracking server that died during the stage does not fail it: the outputs are good (DVC records them).
    journal = tracker.sink.journal
    print(f"[rlhf] stage '{stage}' done in {time.perf_counter() - started:.1f}s"
          + (f"; tracking incomplete, kept in {journal.path} for `rlhf sync`" if journal else ""))
