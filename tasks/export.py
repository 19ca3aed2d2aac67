"""The export stage: the rounded model as ONNX QDQ, AIMET-style encodings, integer weights
and an example input (a few rows, by ONNX input name)."""

from __future__ import annotations

import torch

from adaround_core.export.onnx_export import export_quantized, run_onnx_inputs
from tasks.artifacts import Artifact
from tasks.datasets import first_rows, to_cpu
from tasks.failures import pipeline_task
from tasks.io import atomic_write_bytes, file_digest, save_tensors, write_json
from tasks.layout import Layout
from tasks.model_state import calibrated_model, calibration_inputs
from tasks.params import PipelineParams
from tasks.run_logging import run_logger

EXAMPLE_ROWS = 2  # rows of the first calibration batch traced (the batch axis is dynamic)


@pipeline_task(retries=1)
def export_model(params: PipelineParams, dataset: Artifact, float_model: Artifact,
                 rounded: Artifact) -> Artifact:
    """Export the AdaRound checkpoint's model (on the CPU); each file is written atomically.
    Returns the ONNX model's path and digest."""
    layout = Layout(params)
    model = calibrated_model(params, dataset, float_model, rounded).cpu()
    example = to_cpu(first_rows(calibration_inputs(params, dataset)[0], EXAMPLE_ROWS))
    exported = export_quantized(model, example)
    save_tensors(layout.integer_weights, exported.integer_tensors)
    write_json(layout.encodings, exported.encodings)
    feed = run_onnx_inputs(example, exported.onnx_model)
    save_tensors(layout.example_inputs, {k: torch.from_numpy(v) for k, v in feed.items()})
    atomic_write_bytes(layout.onnx_model, exported.onnx_model.SerializeToString())
    run_logger(__name__).info("exported %s (%d quantized activations)", layout.onnx_model,
                              len(exported.encodings["activation_encodings"]))
    return Artifact(str(layout.onnx_model), file_digest(layout.onnx_model))
