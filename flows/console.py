"""What a person sees when a run fails: one message at the end, no traceback.

Prefect logs a failure at every level it passes (the task, its retries, the flow, the final
state), each with a traceback. For the failures the pipeline explains itself (a
:class:`~rlhf_core.errors.UserFacingError`, a bad parameter, an interrupt) those console lines say
nothing the final message does not, so :func:`quiet_reported_failures` keeps them off the
terminal; the Prefect UI (the API log handler) still gets every one, and the stage's own output,
streamed before, is its log.
"""

from __future__ import annotations

import logging

import typer

from rlhf_core.errors import UserFacingError
from tasks.params import ParamsError

INTERRUPTED = (
    "interrupted: the running stage was stopped, its MLflow run and the pipeline's parent run are marked KILLED and "
    "the Prefect flow run crashed. Intact: params.yaml, the outputs of the stages that finished, and the DVC cache, "
    "which holds the interrupted stage's previous outputs (`dvc checkout <stage>` restores them). `rlhf run` goes on "
    "from there; training stages resume from their last checkpoint."
)
REPORTED = (UserFacingError, ParamsError, KeyboardInterrupt)
"""Errors the CLI reports itself, in one message."""
ENGINE_LINES = ("Finished in state Failed(", "Finished in state Crashed(", "Crash detected!")


def prefect_server_lost(err: BaseException) -> bool:
    """Did Prefect's client lose its server (an ``httpx`` connection or protocol error, after its own retries)?"""
    import httpx

    return isinstance(err, httpx.TransportError)


def server_lost_message(err: BaseException, url: str | None) -> str:
    """What ``rlhf run`` says when the Prefect server stopped answering in the middle of a run."""
    where = url or "the temporary Prefect server"
    return (f"the Prefect server {where} stopped answering ({type(err).__name__}: {err}), so Prefect could not record the "
            "rest of this flow run. What ran is kept: the stages that finished are in dvc.lock, metrics/ and MLflow "
            "(`rlhf status`, `dvc status`). Once a server answers (without PREFECT_API_URL `rlhf run` starts its own), "
            "`rlhf run` goes on from there: finished stages are skipped.")


class QuietReportedFailures(logging.Filter):
    """Drops console records of failures the CLI reports once at the end (their tracebacks included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], REPORTED):
            return False
        if record.exc_info and record.name.startswith("prefect") and prefect_server_lost(record.exc_info[1]):
            return False  # the engine's traceback of a server that went away: the final message says it
        message = record.getMessage()
        if record.name == "urllib3.connectionpool" and message.startswith("Retrying"):
            return False  # MLflow's bounded retries of a server that is down: the final message names it
        return not (record.name.startswith("prefect") and message.startswith(ENGINE_LINES))


def quiet_reported_failures() -> None:
    """Install :class:`QuietReportedFailures` on Prefect's console handler (not on the handler that feeds the UI)."""
    import prefect.main  # noqa: F401  (imported for its effect: Prefect's logging set up, as any flow import does)
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(isinstance(f, QuietReportedFailures) for f in handler.filters):
            handler.addFilter(QuietReportedFailures())


def fail(message: str, code: int) -> typer.Exit:
    """Print ``message`` once, in red, on stderr; return the exit to raise."""
    typer.secho(f"\n[rlhf] {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)
