"""Checks that run before the expensive work, so a bad config fails in seconds, not hours."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from tasks.failures import DiskError, disk_problem
from tasks.io import import_object
from tasks.model_state import compute_device
from tasks.params import PipelineParams, PreflightError

STAGE_ORDER = ("data", "train", "calibrate", "adaround", "export", "evaluate")
# Each callable of the params and the last stage that calls it: a stage checks only
# what it or a later stage will call (every stage streams a Dataset source's batches).
CALLABLE_LAST_USED_BY = {"data.source": "evaluate", "data.batch_process": "evaluate",
                         "train.trainer": "train", "model.factory": "evaluate",
                         "eval.metric": "evaluate"}


def callables_needed_from(stage: str) -> list[str]:
    """The params keys of the callables that ``stage`` or a later stage calls."""
    start = STAGE_ORDER.index(stage)
    return [key for key, last in CALLABLE_LAST_USED_BY.items()
            if STAGE_ORDER.index(last) >= start]


def check_callables(params: PipelineParams, keys: list[str] | None = None) -> None:
    """Every ``module:function`` of the params (or of ``keys``) imports and is callable
    (an optional one set to null is skipped)."""
    for key in keys or list(CALLABLE_LAST_USED_BY):
        section, field = key.split(".")
        spec = getattr(getattr(params, section), field)
        if spec is None:
            continue
        try:
            target = import_object(spec)
        except ValueError as err:
            raise PreflightError(f"params.yaml: {key}: {err}") from None
        if not callable(target):
            raise PreflightError(f"params.yaml: {key}: {spec!r} is a "
                                 f"{type(target).__name__}, not a callable")


RUNTIME_DIRS = ("data_dir", "checkpoint_dir", "results_dir", "cache_dir")
MIN_FREE_BYTES = 64 * 2**20  # a runtime dir with less free space fails before any work


def check_pretrained(params: PipelineParams) -> None:
    """``model.pretrained``, when set, names a readable file."""
    path = params.model.pretrained
    if path is None:
        return
    if not Path(path).is_file():
        raise PreflightError(f"params.yaml: model.pretrained: {path} does not exist; point it "
                             f"at the float model's state_dict file, or set it to null to "
                             f"train with train.trainer")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as err:
        raise PreflightError(f"params.yaml: model.pretrained: {path} cannot be read "
                             f"({err.strerror})") from None


def check_writable(directory: Path, key: str) -> None:
    """``directory`` (or, while it does not exist yet, its nearest existing parent) can be
    written and has some free space; nothing is created."""
    target = _nearest_existing(Path(directory).absolute())
    if not target.is_dir():
        raise PreflightError(f"params.yaml: {key}: {target} is a file, not a directory")
    if not os.access(target, os.W_OK | os.X_OK):
        code = errno.EROFS if os.statvfs(target).f_flag & os.ST_RDONLY else errno.EACCES
        raise disk_problem(OSError(code, "not writable"), directory, key)
    free = shutil.disk_usage(target).free
    if free < MIN_FREE_BYTES:
        raise DiskError(errno.ENOSPC, f"{directory} has only {free / 2**20:.1f} MiB free "
                                      f"(at least {MIN_FREE_BYTES // 2**20} MiB needed); free "
                                      f"space there or point {key} at another disk")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_runtime_dirs(params: PipelineParams) -> None:
    """Every ``runtime.*_dir`` can be written."""
    for key in RUNTIME_DIRS:
        check_writable(Path(getattr(params.runtime, key)), f"runtime.{key}")


def preflight(params: PipelineParams, stage: str = "data") -> None:
    """Before ``stage`` touches anything: the callables it and the later stages call import,
    ``runtime.device`` exists, ``model.pretrained`` is readable, the runtime dirs can be
    written and, when tracking is on, the MLflow store answers."""
    check_callables(params, callables_needed_from(stage))
    try:
        compute_device(params)
    except ValueError as err:
        raise PreflightError(str(err)) from None
    check_pretrained(params)
    check_runtime_dirs(params)
    if params.tracking.enabled:
        from tasks.tracking import check_tracking_store  # imported late: mlflow takes ~1 s

        check_tracking_store(params)
