"""Rebuilding models from checkpoints (helpers of the tasks, not tasks themselves)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from adaround_core.fake_quantize import FakeQuantState, set_fake_quantize
from adaround_core.prepare import prepare_qat_fx
from adaround_core.quant_layers import quant_layers
from tasks.io import import_object, load_tensors
from tasks.params import PipelineParams


def compute_device(params: PipelineParams) -> torch.device:
    """The device of ``runtime.device`` (``auto``: CUDA when present, else the CPU)."""
    name = params.runtime.device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"params.yaml: runtime.device: {name!r} but this torch sees no "
                             f"CUDA device; use cpu or auto")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"params.yaml: runtime.device: {name!r} but only "
                             f"{torch.cuda.device_count()} CUDA device(s) are present")
    return device


def build_float_model(params: PipelineParams) -> nn.Module:
    """A fresh float model from ``model.factory`` (random weights)."""
    factory = import_object(params.model.factory)
    model = factory(**params.model.kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model.factory {params.model.factory!r} returned "
                        f"{type(model).__name__}, not a torch.nn.Module")
    return model


def load_float_model(params: PipelineParams, checkpoint: Path) -> nn.Module:
    """The float model with the weights of ``checkpoint``, in eval mode, on the compute
    device."""
    model = build_float_model(params)
    model.load_state_dict(load_tensors(checkpoint))
    return model.to(compute_device(params)).eval()


def calibration_batches(params: PipelineParams, dataset: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The calibration inputs, split into batches, on the compute device."""
    calib = dataset["calib_x"][: params.calibration.num_samples].to(compute_device(params))
    return list(calib.split(params.calibration.batch_size))


def load_calibrated_model(params: PipelineParams, float_checkpoint: Path,
                          calibrated_checkpoint: Path, example: torch.Tensor) -> nn.Module:
    """The prepared model with calibrated qparams, in the VALIDATION state and eval mode."""
    model = prepare_qat_fx(load_float_model(params, float_checkpoint), params.quant.qconfig(),
                           example_inputs=example)
    model.load_state_dict(load_tensors(calibrated_checkpoint))
    set_fake_quantize(model, FakeQuantState.VALIDATION)
    return model.eval()


@torch.no_grad()
def apply_rounded_weight(model: nn.Module, name: str, weight: torch.Tensor) -> None:
    """Write a layer's AdaRound result into ``model``, freezing its weight grid first."""
    layers = quant_layers(model)
    if name not in layers:
        raise KeyError(f"layer {name!r} from the results does not exist in the model; the "
                       f"model changed since the results were made: delete them and rerun")
    layer = layers[name]
    if tuple(weight.shape) != tuple(layer.weight.shape):
        raise ValueError(f"result for {name!r} has shape {tuple(weight.shape)}, the layer "
                         f"{tuple(layer.weight.shape)}")
    layer.weight_fake_quant.freeze()
    layer.weight.copy_(weight)
