"""Run-time plumbing of the flows: the task runner and the lock on the output dirs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.layout import Layout
from tasks.params import PipelineParams

logger = logging.getLogger(__name__)
_LOCKS: dict[str, FileLock] = {}  # one reentrant lock object per path in this process


class OutputsBusyError(RuntimeError):
    """Another run holds this configuration's output dirs (try again when it has finished)."""


def make_task_runner(params: PipelineParams):
    """A thread pool by default; Prefect's DaskTaskRunner on an existing cluster if asked."""
    runtime = params.runtime
    if runtime.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=runtime.max_workers)
    if not runtime.dask_address:
        raise ValueError("runtime.task_runner is 'dask' but runtime.dask_address is not set "
                         "(e.g. tcp://127.0.0.1:8786)")
    from prefect_dask import DaskTaskRunner  # optional: only the scale-out path needs it

    return DaskTaskRunner(address=runtime.dask_address)


@contextlib.contextmanager
def output_lock(params: PipelineParams) -> Iterator[None]:
    """Hold the lock of this configuration's output dirs; a second run waits
    ``runtime.lock_timeout`` seconds, then fails naming the lock file."""
    path = Layout(params).lock
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _LOCKS.setdefault(str(path.resolve()), FileLock(str(path)))
    try:
        _acquire_saying_so(lock, path, params.runtime.lock_timeout)
    except Timeout:
        raise OutputsBusyError(f"another pipeline run holds {path} (waited "
                           f"{params.runtime.lock_timeout:g} s); wait for it to finish or use "
                           f"other runtime directories") from None
    try:
        yield
    finally:
        lock.release()


def _acquire_saying_so(lock: FileLock, path: Path, timeout: float) -> None:
    """Take ``lock``; when another run holds it, say so once, then wait up to ``timeout``."""
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if timeout <= 0:
            raise
        logger.warning("another pipeline run holds %s: waiting up to %g s for it to finish "
                       "(runtime.lock_timeout)", path, timeout)
        lock.acquire(timeout=timeout)


def lock_path(params: PipelineParams) -> Path:
    return Layout(params).lock


RUNTIME_DIRS = ("data_dir", "checkpoint_dir", "results_dir", "cache_dir")


def anchored(params: PipelineParams, root: Path) -> PipelineParams:
    """``params`` with relative runtime dirs (and ``model.pretrained``) made absolute under
    ``root``: for runs whose working directory is not the project's (Dask workers, the
    process a scheduled run executes in)."""
    root = Path(root).resolve()

    def absolute(path: str) -> str:
        return str(path if Path(path).is_absolute() else root / path)

    runtime = params.runtime.model_copy(
        update={key: absolute(getattr(params.runtime, key)) for key in RUNTIME_DIRS})
    model = params.model
    if model.pretrained:
        model = model.model_copy(update={"pretrained": absolute(model.pretrained)})
    return params.model_copy(update={"runtime": runtime, "model": model})
