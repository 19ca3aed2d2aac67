"""Baseline calibration: observers over the calibration batches, qparams fixed."""

from __future__ import annotations

from pathlib import Path

import torch

from adaround_core.calibration.batches import call_model
from adaround_core.quant.fake_quantize import FakeQuantState, set_fake_quantize
from adaround_core.quant.prepare import prepare_qat_fx
from tasks.artifacts import Artifact
from tasks.failures import pipeline_task
from tasks.io import save_tensors
from tasks.model_state import calibration_inputs, load_float_model
from tasks.params import PipelineParams
from tasks.run_logging import run_logger


@pipeline_task(retries=1)
def calibrate(params: PipelineParams, dataset: Artifact, float_model: Artifact,
              out: str) -> Artifact:
    """Prepare, calibrate and save the fake-quant model (nearest rounding) to ``out``."""
    batches = calibration_inputs(params, dataset)
    model = prepare_qat_fx(load_float_model(params, float_model.file), params.quant,
                           example_inputs=batches[0]).eval()
    set_fake_quantize(model, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for batch in batches:
            call_model(model, batch)
    set_fake_quantize(model, FakeQuantState.VALIDATION)  # turns statistics into qparams
    digest = save_tensors(Path(out), model.state_dict())
    run_logger(__name__).info("calibrated on %d batches; saved to %s", len(batches), out)
    return Artifact(out, digest)
