"""Errors whose message says everything a user needs: the pipeline prints them in one line, without a traceback."""

from __future__ import annotations


class UserFacingError(RuntimeError):
    """Base of the errors a stage reports as ``stage '<name>' failed: <message>`` (e.g. training diverged)."""
