"""How long this process spent in the work the hardware is for: training, generation and scoring loops.

The pipeline's compute share (``rlhf run``'s summary, ``pipeline/compute_share`` on the parent run) is
this time summed over the stages that ran, divided by the run's wall time; what is left is overhead
(process starts, imports, loading and saving, tracking, DVC). Loops mark themselves with
:func:`computing`; nested marks count once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any, TypeVar

_seconds = 0.0
_depth = 0
F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def computing() -> Iterator[None]:
    """Count the time inside the block as compute (once, however deeply such blocks nest)."""
    global _seconds, _depth
    _depth += 1
    started = time.perf_counter()
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            _seconds += time.perf_counter() - started


def compute_loop(fn: F) -> F:
    """Decorator form of :func:`computing` for a function that is a training, generation or scoring loop."""

    @wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        with computing():
            return fn(*args, **kwargs)

    return timed  # type: ignore[return-value]


def compute_seconds() -> float:
    """Seconds this process has spent in :func:`computing` blocks that have ended."""
    return _seconds
