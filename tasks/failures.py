"""Which failures a user fixes (bad input, a full disk) and which a retry may fix.

Tasks retry only transient failures (:func:`retry_if_transient`); the CLI reports a user's
failure in one line (:func:`is_user_error`), and disk failures with what to do about them
(:func:`disk_problem`).
"""

from __future__ import annotations

import errno
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from adaround_core.reconstruction.distributed import RankLostError
from tasks.params import PreflightError

# errno -> (what happened, what to do); the directory's settings key is added by the caller
DISK_PROBLEMS = {
    errno.ENOSPC: ("the disk is full", "free space there or point {key} at another disk"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space there or point {key} elsewhere"),
    errno.EROFS: ("the file system is read-only", "point {key} at a writable directory"),
    errno.EACCES: ("permission denied", "point {key} at a directory you can write to"),
    errno.EPERM: ("operation not permitted", "point {key} at a directory you can write to"),
}
USER_ERRORS = (ValueError, LookupError, FileNotFoundError, PreflightError)


class DiskError(OSError):
    """A directory the pipeline writes cannot take the file; the message says what to do."""

    def __str__(self) -> str:
        return str(self.strerror)


def disk_problem(err: OSError, directory: object, key: str,
                 what: str = "files") -> DiskError | None:
    """A :class:`DiskError` for writing ``what`` to a full, read-only or forbidden
    ``directory`` whose settings key is ``key`` (None for any other ``err``)."""
    if isinstance(err, DiskError):
        return err
    if err.errno not in DISK_PROBLEMS:
        return None
    problem, fix = DISK_PROBLEMS[err.errno]
    return DiskError(err.errno, f"cannot write {what} under {directory}: {problem}; "
                                f"{fix.format(key=key)}")


def is_disk_error(exc: BaseException) -> bool:
    """A directory that is full, read-only or forbidden (not a missing file)."""
    return isinstance(exc, DiskError) or (isinstance(exc, OSError)
                                          and not isinstance(exc, FileNotFoundError)
                                          and exc.errno in DISK_PROBLEMS)


def is_user_error(exc: BaseException) -> bool:
    """Bad input, a missing file, a full or read-only disk: fixed by the user, not a retry."""
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
        return is_disk_error(exc)
    return isinstance(exc, USER_ERRORS)


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: retry unless the failure is the user's to fix (or a
    type error, or a torchrun rank that stopped: no retry changes either)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:
            return True
    return not (is_user_error(exc) or isinstance(exc, (TypeError, RankLostError)))


def pipeline_task(retries: int = 0, retry_delay_seconds: float = 0, **options: Any):
    """The ``@task`` of the pipeline: no Prefect cache (keys are ours), no persisted results
    (paths and digests come back in memory; a failed run leaves no pickled exception), and
    retries only of transient failures."""
    return task(retries=retries, retry_delay_seconds=retry_delay_seconds,
                retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE,
                persist_result=False, **options)
