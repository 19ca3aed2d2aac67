"""Named metrics: ``eval.metric``'s result, ``metrics.json``'s layout and MLflow's names.

``eval.metric`` is ``module:function(model, loader, *, float_model) -> {name: number}``: the
loader yields the evaluation batches on the model's device (the digits default: ``(x, y)``),
``float_model`` is the float model (for metrics relative to it, e.g. cosine to float).
Each name becomes ``metrics.json``'s ``{role: {name: value}}`` and ``delta_<name>``
(AdaRound - baseline) and ``adaround_vs_float_<name>``, and MLflow metrics of the same names.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from tasks.datasets import first_line
from tasks.io import import_object
from tasks.params import PipelineParams

ROLES = ("float", "baseline", "adaround")
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-/ ]*")  # what MLflow takes as a metric name
RESERVED = ("agreement", "max_abs_diff", "min_cosine")  # the ONNX parity's own names


class MetricError(ValueError):
    """``eval.metric`` failed or returned something other than named numbers."""

    def __init__(self, spec: str, problem: str) -> None:
        super().__init__(f"eval.metric {spec!r}: {problem}")


def named_numbers(result: object, spec: str) -> dict[str, float]:
    """``result`` as ``{name: float}``, or :class:`MetricError` saying what is wrong."""
    example = "return named numbers, e.g. {'top1': 97.5}"
    if not isinstance(result, dict) or not result:
        got = "an empty dict" if isinstance(result, dict) else type(result).__name__
        raise MetricError(spec, f"returned {got}; {example}")
    values = {}
    for name, value in result.items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise MetricError(spec, f"returned the name {name!r}; names are strings of "
                                    f"letters, digits, '_', '-', '.', '/' and spaces")
        if name in RESERVED or name.startswith("reference_"):
            raise MetricError(spec, f"returned the name {name!r}, which the ONNX parity "
                                    f"check uses; rename it")
        values[name] = _number(value, name, spec)
    return values


def _number(value: Any, name: str, spec: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MetricError(spec, f"{name!r} is {type(value).__name__}, not a number; return "
                                f"float(...) per name")
    if not math.isfinite(float(value)):
        raise MetricError(spec, f"{name!r} is {value}; metrics must be finite")
    return float(value)


def score(params: PipelineParams, model: nn.Module, batches: Iterable,
          float_model: nn.Module) -> dict[str, float]:
    """``eval.metric`` of ``model`` on ``batches``, checked to be named numbers."""
    spec = params.eval.metric
    try:
        with torch.no_grad():
            result = import_object(spec)(model, batches, float_model=float_model)
    except Exception as err:  # the user's code: any failure is the metric's
        raise MetricError(spec, f"failed: {type(err).__name__}: {first_line(err)}") from None
    return named_numbers(result, spec)


def metrics_file(scores: dict[str, dict[str, float]],
                 onnx: dict[str, float] | None = None) -> dict:
    """``metrics.json``: each role's numbers, ``delta_<name>`` and
    ``adaround_vs_float_<name>`` for each name, and the ONNX Runtime numbers."""
    metrics: dict = {role: dict(scores[role]) for role in ROLES}
    for name in scores["adaround"]:
        metrics[f"delta_{name}"] = scores["adaround"][name] - scores["baseline"][name]
        metrics[f"adaround_vs_float_{name}"] = scores["adaround"][name] - scores["float"][name]
    if onnx is not None:
        metrics["onnx"] = dict(onnx)
    return metrics


def metric_names(metrics: dict) -> list[str]:
    """The metric's names in a ``metrics.json``."""
    return list(metrics["adaround"])


def by_run_role(metrics: dict, parent: str) -> dict[str, dict[str, float]]:
    """MLflow's metrics per run: the parent run gets ``<role>_<name>``, ``delta_<name>``,
    ``adaround_vs_float_<name>`` and ``onnx_*``; each child run its role's numbers and
    deltas."""
    onnx = {f"onnx_{k}": v for k, v in metrics.get("onnx", {}).items()}
    runs: dict[str, dict[str, float]] = {parent: {}, "float": {}, "baseline": {},
                                         "adaround": {}}
    for name in metric_names(metrics):
        f, b, a = (metrics[role][name] for role in ROLES)
        delta, vs_float = metrics[f"delta_{name}"], metrics[f"adaround_vs_float_{name}"]
        runs[parent].update({f"float_{name}": f, f"baseline_{name}": b,
                             f"adaround_{name}": a, f"delta_{name}": delta,
                             f"adaround_vs_float_{name}": vs_float})
        runs["float"][name] = f
        runs["baseline"].update({name: b, f"delta_vs_float_{name}": b - f})
        runs["adaround"].update({name: a, f"delta_{name}": delta,
                                 f"delta_vs_float_{name}": vs_float})
    runs[parent].update(onnx)
    return runs
