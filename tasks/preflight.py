"""Checks that run before the expensive work, so a bad config fails in seconds, not hours."""

from __future__ import annotations

from tasks.io import import_object
from tasks.params import PipelineParams


class PreflightError(RuntimeError):
    """The configuration cannot work; the message names the setting and how to fix it."""


def check_callables(params: PipelineParams) -> None:
    """Every ``module:function`` of the params imports and is callable."""
    for key, spec in (("data.source", params.data.source),
                      ("model.factory", params.model.factory),
                      ("eval.metric", params.eval.metric)):
        try:
            target = import_object(spec)
        except ValueError as err:
            raise PreflightError(f"params.yaml: {key}: {err}") from None
        if not callable(target):
            raise PreflightError(f"params.yaml: {key}: {spec!r} is a "
                                 f"{type(target).__name__}, not a callable")


def preflight(params: PipelineParams) -> None:
    """The callables import and, when tracking is on, the MLflow store answers."""
    check_callables(params)
    if params.tracking.enabled:
        from tasks.tracking import check_tracking_store  # imported late: mlflow takes ~1 s

        check_tracking_store(params)
