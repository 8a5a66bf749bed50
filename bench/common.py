"""Helpers the benchmarks share: a step clock, peak memory, isolated worker processes, medians, tables.

Each measured run is meant to happen in a fresh worker process (``run_worker``), so that peak-memory
readings never mix between runs. torch is imported only where CUDA memory is read.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",
    "WANDB_DISABLED": "true",
}
"""Environment of a worker: no hub access, no progress bars (their redraws would be timed too)."""


class StepClock:
    """Wall-clock and CPU time at the end of every optimizer step; throughput after ``warmup_steps``.

    Steps/s = (n − w) / (t_n − t_w), where t_k is the time at the end of step k and w the warm-up
    steps: setup, the first steps' allocations and lazy initialisation fall outside the window.
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each reading so queued GPU work is counted.
    The CPU-time variant (``time.process_time``: all threads of this process) does not count time
    spent waiting for a core, so on a machine shared with other work it is the steadier of the two.
    """

    def __init__(self, warmup_steps: int, sync: Callable[[], None] | None = None) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        self.sync = sync
        self.start_time: tuple[float, float] | None = None
        self.step_times: list[tuple[float, float]] = []
        """(wall, CPU) seconds at the end of each step."""

    def _now(self) -> tuple[float, float]:
        if self.sync is not None:
            self.sync()
        return time.perf_counter(), time.process_time()

    def start(self) -> None:
        """Mark the start of training (the reference point for a zero warm-up)."""
        self.start_time = self._now()

    def step_end(self) -> None:
        """Mark the end of one optimizer step."""
        self.step_times.append(self._now())

    @property
    def timed_steps(self) -> int:
        return max(len(self.step_times) - self.warmup_steps, 0)

    def steps_per_second(self, *, cpu: bool = False) -> float:
        """Steps per wall-clock second (``cpu``: per CPU second) after the warm-up; raises if none were timed."""
        if self.timed_steps == 0:
            raise ValueError(
                f"no timed steps: {len(self.step_times)} steps ran, {self.warmup_steps} are warm-up; "
                "run more steps or lower the warm-up"
            )
        if self.warmup_steps == 0:
            if self.start_time is None:
                raise ValueError("StepClock.start() was not called, and there is no warm-up step to time from")
            t0 = self.start_time
        else:
            t0 = self.step_times[self.warmup_steps - 1]
        which = 1 if cpu else 0
        return self.timed_steps / (self.step_times[-1][which] - t0[which])


class PeakMemory:
    """Memory of this process in MB: RSS on CPU, torch's allocator on CUDA (current and peak).

    On Linux ``reset()`` clears the RSS high-water mark (``/proc/self/clear_refs``, value 5), so a
    peak reading covers only what ran since; elsewhere it covers the whole process.
    """

    def __init__(self, device: str) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        # Not Linux (or not permitted): peak readings then cover the whole process.
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")

    def peak_mb(self) -> float:
        if self.device == "cuda":
            import torch

            return torch.cuda.max_memory_allocated() / 2**20
        return process_peak_rss_mb()

    def current_mb(self) -> float:
        if self.device == "cuda":
            import torch

            return torch.cuda.memory_allocated() / 2**20
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**10  # kB
        except OSError:
            pass
        return process_peak_rss_mb()  # no /proc: the best available upper bound


def process_peak_rss_mb() -> float:
    """RSS high-water mark of this process in MB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def run_worker(module: str, spec: dict[str, Any], *, timeout_s: float = 600.0) -> dict[str, Any]:
    """Run ``python -m <module> --worker <spec.json>`` in a fresh process and return the JSON it wrote.

    The worker must write its result to ``spec["result_path"]`` (set here). Raises ``RuntimeError``
    with the end of the worker's output when it fails.
    """
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        result_path = Path(tmp) / "result.json"
        spec_path.write_text(json.dumps({**spec, "result_path": str(result_path)}))
        # The worker imports ``module`` from this repository whatever the caller's working directory.
        repo_root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", module, "--worker", str(spec_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        if proc.returncode != 0 or not result_path.exists():
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise RuntimeError(f"benchmark worker {' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(result_path.read_text())


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; every row must have one cell per header; ``|`` in a cell is escaped."""
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {list(row)} has {len(row)} cells, expected {len(headers)} ({list(headers)})")

    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(headers), "|" + "|".join("---" for _ in headers) + "|", *(line(row) for row in rows)])
