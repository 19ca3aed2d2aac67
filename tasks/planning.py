"""Which layers to round, in which order (read off one forward pass), and how their
inputs are captured (one continued pass where the model's graph allows it); with
``granularity: block``, which of them are rounded together as one block unit."""

from __future__ import annotations

from adaround_core.calibration.batches import model_device
from adaround_core.reconstruction.threads import capture_threads
from adaround_core.reconstruction.unit_order import block_calls
from adaround_core.reconstruction.units import plan_units
from adaround_core.reconstruction.weight_reconstruction import rounding_order
from tasks.artifacts import Artifact, LayerPlan
from tasks.capture import capture_verdict
from tasks.disk_budget import layer_cache_bytes
from tasks.failures import pipeline_task
from tasks.model_state import calibrated_model, calibration_inputs, compute_device
from tasks.params import PipelineParams
from tasks.run_logging import run_logger


@pipeline_task(retries=1)
def plan_layers(params: PipelineParams, dataset: Artifact, float_model: Artifact,
                calibrated: Artifact) -> LayerPlan:
    """Layers in first-call order, minus ``adaround.exclude_prefix``, the capture method (a
    warning says why when the per-layer fallback is used) and each layer's cache size."""
    batches = calibration_inputs(params, dataset)
    example = batches[0]
    model = calibrated_model(params, dataset, float_model, calibrated)
    names, calls, largest_call = rounding_order(model, example, params.adaround.exclude_prefix)
    threads = capture_threads(params.adaround.num_threads, model_device(model), largest_call)
    blocks = {}
    if params.adaround.granularity == "block":
        units = plan_units(model, names, params.adaround)
        calls |= block_calls(model, units, example)
        names = [u.name for u in units]
        blocks = {u.name: u.layers for u in units if u.is_block}
    method, note = capture_verdict(model, names, example, params.adaround.num_threads,
                                   list(blocks))
    cache_bytes = layer_cache_bytes(model, names, batches,
                                    codes=not params.adaround.trains_activations)
    run_logger(__name__).info("rounding %d units on %s: %s; capture: %s%s on %d thread(s); "
                              "largest activation cache %.1f MiB", len(names),
                              compute_device(params), names, method,
                              f" ({note})" if note else "", threads,
                              max(cache_bytes.values(), default=0) / 2**20)
    return LayerPlan(names, calls, method, note, cache_bytes, blocks, threads)
