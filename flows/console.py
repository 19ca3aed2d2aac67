"""What a command prints: log levels by verbosity, and a failure as one line.

By default a command prints its progress bar, warnings and a short summary. Prefect's
per-run state lines, its "View at" links (the temporary server has no UI and is gone
afterwards) and its copies of task tracebacks appear with ``-v``, or when a real Prefect
server is configured (its UI shows them). A failure the user fixes is one line, with an
exit code saying what kind; ``--debug`` (or ``ADAROUND_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys

OUR_PACKAGES = ("adaround_core", "tasks", "flows")
PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
DEBUG_ENV = "ADAROUND_DEBUG"

EXIT_BAD_INPUT = 2  # bad params or data, a missing file, an unreachable store: fix, then rerun
EXIT_DISK = 74  # a full, read-only or forbidden directory (EX_IOERR)
EXIT_BUSY = 75  # another run holds the outputs (EX_TEMPFAIL): rerun when it has finished
EXIT_RANK_LOST = 76  # another torchrun rank stopped (EX_PROTOCOL): rerun to resume


def configure_logging(verbose: bool) -> None:
    """Our packages at INFO with ``-v``, else WARNING; third-party chatter at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in OUR_PACKAGES:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    # MLflow configures its own loggers when imported (later, and only when tracking is on)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")


def show_prefect_runs(show: bool) -> None:
    """Prefect's flow- and task-run loggers on (Prefect's own levels) or off. Call it after
    Prefect is imported (its logging set-up would reset the levels)."""
    for name in PREFECT_RUN_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if show else logging.CRITICAL)


def debug_requested(flag: bool) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0", "false")


def exit_code(err: BaseException) -> int | None:
    """The exit code of a failure the user acts on; None for anything else (a bug)."""
    from adaround_core.reconstruction.distributed import RankLostError
    from flows.runtime import OutputsBusyError  # imported late: they import torch
    from tasks.failures import is_disk_error, is_user_error

    if isinstance(err, OutputsBusyError):
        return EXIT_BUSY
    if isinstance(err, RankLostError):
        return EXIT_RANK_LOST
    if is_disk_error(err):
        return EXIT_DISK
    return EXIT_BAD_INPUT if is_user_error(err) else None


def dvc_hint() -> str:
    """Under ``dvc repro``/``dvc exp run``: what DVC did to this stage's outputs."""
    stage = os.environ.get("DVC_STAGE")
    if not stage:
        return ""
    if stage == "check":
        return " (checked before any stage ran: no output was touched)"
    return (f" (DVC removed the outputs of stage {stage!r} before running it; "
            f"`dvc checkout {stage}` brings back the previous ones, `git checkout` the files "
            f"git tracks)")


def report_failure(err: BaseException) -> None:
    """``error: <message>`` as one line on stderr."""
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"error: {message}{dvc_hint()}", file=sys.stderr)
