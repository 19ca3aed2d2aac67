"""Which layers to round, in which order: read off one forward pass."""

from __future__ import annotations

from adaround_core.reconstruction.weight_reconstruction import rounding_order
from tasks.artifacts import Artifact, LayerPlan
from tasks.failures import pipeline_task
from tasks.model_state import calibrated_model, calibration_inputs, compute_device
from tasks.params import PipelineParams
from tasks.run_logging import run_logger


@pipeline_task(retries=1)
def plan_layers(params: PipelineParams, dataset: Artifact, float_model: Artifact,
                calibrated: Artifact) -> LayerPlan:
    """Layers in first-call order, minus ``adaround.exclude_prefix``."""
    example = calibration_inputs(params, dataset)[0]
    model = calibrated_model(params, dataset, float_model, calibrated)
    names, calls = rounding_order(model, example, params.adaround.exclude_prefix)
    run_logger(__name__).info("rounding %d layers on %s: %s", len(names),
                              compute_device(params), names)
    return LayerPlan(names, calls)
