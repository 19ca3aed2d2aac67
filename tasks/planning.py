"""Which layers to round, in which order: read off one forward pass."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from adaround_core.fake_quantize import FakeQuantState
from adaround_core.layer_capture import first_call_order
from adaround_core.model_modes import fake_quant_state
from adaround_core.quant_layers import quant_layers
from adaround_core.weight_reconstruction import check_calibrated, select_layers
from tasks.artifacts import Artifact, LayerPlan
from tasks.io import load_tensors
from tasks.model_state import calibration_batches, load_calibrated_model
from tasks.params import PipelineParams
from tasks.run_logging import run_logger


@task(retries=1, cache_policy=NO_CACHE)
def plan_layers(params: PipelineParams, dataset: Artifact, float_model: Artifact,
                calibrated: Artifact) -> LayerPlan:
    """Layers in first-call order, minus ``adaround.exclude_prefix``."""
    batches = calibration_batches(params, load_tensors(dataset.file))
    model = load_calibrated_model(params, float_model.file, calibrated.file, batches[0])
    layers = quant_layers(model)
    with fake_quant_state(model, FakeQuantState.FLOAT):
        order, calls = first_call_order(model, layers, batches[0])
    names = select_layers(order, params.adaround.exclude_prefix)
    check_calibrated(layers, names)
    run_logger(__name__).info("rounding %d layers on %s: %s", len(names),
                              batches[0].device, names)
    return LayerPlan(names, {n: calls[n] for n in names})
