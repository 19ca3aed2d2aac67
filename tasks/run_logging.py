"""The logger of task bodies: Prefect's run logger inside a run, the module's logger outside.

Task bodies stay callable as plain functions (``task.fn()`` in tests, scripts): Prefect's
``get_run_logger`` raises ``MissingContextError`` when no flow or task run is active. When
the command has switched Prefect's run loggers off (its default, quiet output), the module's
logger is used too, so warnings still reach the terminal.
"""

from __future__ import annotations

import logging

from prefect import get_run_logger
from prefect.exceptions import MissingContextError


def run_logger(fallback: str = "tasks") -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger (logs reach the run in the UI), else ``logging.getLogger(fallback)``."""
    if not logging.getLogger("prefect.task_runs").isEnabledFor(logging.WARNING):
        return logging.getLogger(fallback)
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(fallback)
