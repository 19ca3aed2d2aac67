"""Checks that run before the expensive work, so a bad config fails in seconds, not hours."""

from __future__ import annotations

from tasks.io import import_object
from tasks.model_state import compute_device
from tasks.params import PipelineParams, PreflightError

STAGE_ORDER = ("data", "train", "calibrate", "adaround", "evaluate")
# Each callable of the params and the last stage that calls it: a stage checks only
# what it or a later stage will call (the adaround stage does not import the data source).
CALLABLE_LAST_USED_BY = {"data.source": "data", "train.trainer": "train",
                         "model.factory": "evaluate", "eval.metric": "evaluate"}


def callables_needed_from(stage: str) -> list[str]:
    """The params keys of the callables that ``stage`` or a later stage calls."""
    start = STAGE_ORDER.index(stage)
    return [key for key, last in CALLABLE_LAST_USED_BY.items()
            if STAGE_ORDER.index(last) >= start]


def check_callables(params: PipelineParams, keys: list[str] | None = None) -> None:
    """Every ``module:function`` of the params (or of ``keys``) imports and is callable."""
    for key in keys or list(CALLABLE_LAST_USED_BY):
        section, field = key.split(".")
        spec = getattr(getattr(params, section), field)
        try:
            target = import_object(spec)
        except ValueError as err:
            raise PreflightError(f"params.yaml: {key}: {err}") from None
        if not callable(target):
            raise PreflightError(f"params.yaml: {key}: {spec!r} is a "
                                 f"{type(target).__name__}, not a callable")


def preflight(params: PipelineParams, stage: str = "data") -> None:
    """The callables that ``stage`` and the stages after it call import, ``runtime.device``
    exists and, when tracking is on, the MLflow store answers."""
    check_callables(params, callables_needed_from(stage))
    try:
        compute_device(params)
    except ValueError as err:
        raise PreflightError(str(err)) from None
    if params.tracking.enabled:
        from tasks.tracking import check_tracking_store  # imported late: mlflow takes ~1 s

        check_tracking_store(params)
