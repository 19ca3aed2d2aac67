"""The pipeline's side of ``adaround.guard: output``: the calibration batches it holds out
(the engine's split, so the pipeline rounds exactly as ``weight_reconstruction`` does), the
batches the units are cached and optimised on, and the guard of a unit's task (a layer, a
block, a layer with learned activation scales: each judged on the model's output)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from adaround_core.reconstruction.output_guard import GUARD_OUTPUT, OutputGuard, split_held_out
from tasks.artifacts import Artifact, LayerResult
from tasks.model_state import calibrated_model, calibration_inputs, layer_models
from tasks.params import PipelineParams


def guards_output(params: PipelineParams) -> bool:
    return params.adaround.guard == GUARD_OUTPUT


def held_out_settings(params: PipelineParams) -> dict[str, Any]:
    """What decides which batches are held out (part of the activation cache's key), or
    nothing when no batch is (every guard but ``output``)."""
    if not guards_output(params):
        return {}
    cfg = params.adaround
    return {"guard": cfg.guard, "guard_batches": cfg.guard_batches, "seed": cfg.seed}


def _split(params: PipelineParams, dataset: Artifact) -> tuple[list[Any], list[Any]]:
    batches = calibration_inputs(params, dataset)
    if not guards_output(params):
        return batches, []
    cfg = params.adaround
    return split_held_out(batches, cfg.guard_batches, cfg.seed)


def training_inputs(params: PipelineParams, dataset: Artifact) -> list[Any]:
    """The calibration batches the layers are cached and optimised on (all of them, except
    the output guard's held-out ones)."""
    return _split(params, dataset)[0]


def guarded_layer_model(params: PipelineParams, dataset: Artifact, float_model: Artifact,
                        calibrated: Artifact, previous: Sequence[LayerResult],
                        ) -> tuple[nn.Module, OutputGuard | None]:
    """A unit task's model (the earlier units rounded) and, with ``guard: output``, the
    guard on it (the float model's outputs on the held-out batches computed here)."""
    if not guards_output(params):
        return calibrated_model(params, dataset, float_model, calibrated, previous), None
    model, reference = layer_models(params, dataset, float_model, calibrated, previous)
    return model, OutputGuard(model, reference, _split(params, dataset)[1])
