"""The library chain on an example: prepare (BatchNorm folding) -> calibrate -> nearest-rounding
metric -> ``weight_reconstruction`` (AdaRound) -> metric, all through ``adaround_core.quantization``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from adaround_core import quantization as q
from examples.outputs import run_model

Metric = Callable[..., dict[str, float]]


@dataclass
class ChainResult:
    """Metrics of the float model, nearest rounding and AdaRound, with the rounding report."""

    float_metrics: dict[str, float]
    nearest_metrics: dict[str, float]
    adaround_metrics: dict[str, float]
    report: Any
    seconds: dict[str, float] = field(default_factory=dict)

    def format(self) -> str:
        """A small text table: one row per model, one column per metric."""
        keys = list(self.float_metrics)
        rows = [f"{'':<10}" + "".join(f"{k:>22}" for k in keys)]
        for label, values in (("float", self.float_metrics), ("nearest", self.nearest_metrics),
                              ("AdaRound", self.adaround_metrics)):
            rows.append(f"{label:<10}" + "".join(f"{values[k]:>22.4f}" for k in keys))
        return "\n".join(rows)


def quantize_and_compare(float_model: nn.Module, data: dict[str, Dataset], metric: Metric,
                         qconfig: q.QConfig, adaround_config: dict[str, Any],
                         batch_size: int = 32) -> ChainResult:
    """Quantize ``float_model`` with ``qconfig`` on ``data["calibration"]``, round it with
    AdaRound, and score float / nearest / AdaRound with ``metric`` on ``data["evaluation"]``."""
    calibration = DataLoader(data["calibration"], batch_size=batch_size)
    evaluation = DataLoader(data["evaluation"], batch_size=batch_size)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    batches = list(calibration)
    calib_model = q.prepare_qat_fx(float_model, qconfig, example_inputs=batches[0]).eval()
    calibrate(calib_model, batches)
    seconds["prepare_and_calibrate"] = time.perf_counter() - start
    float_metrics = metric(float_model, evaluation, float_model=float_model)
    q.set_fake_quantize(calib_model, q.FakeQuantState.VALIDATION)
    nearest_metrics = metric(calib_model, evaluation, float_model=float_model)
    start = time.perf_counter()
    report = q.weight_reconstruction(calib_model, batches, None, adaround_config)
    seconds["adaround"] = time.perf_counter() - start
    q.set_fake_quantize(calib_model, q.FakeQuantState.VALIDATION)
    adaround_metrics = metric(calib_model, evaluation, float_model=float_model)
    return ChainResult(float_metrics, nearest_metrics, adaround_metrics, report, seconds)


@torch.no_grad()
def calibrate(calib_model: nn.Module, batches: list[Any]) -> None:
    """Run every calibration batch with the observers collecting (CALIBRATION state)."""
    q.set_fake_quantize(calib_model, q.FakeQuantState.CALIBRATION)
    for batch in batches:
        run_model(calib_model, batch)
