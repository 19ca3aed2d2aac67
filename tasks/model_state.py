"""Rebuilding models from checkpoints (helpers of the tasks, not tasks themselves)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaround_core.quant.fake_quantize import FakeQuantState, set_fake_quantize
from adaround_core.quant.model_modes import float_reference
from adaround_core.quant.prepare import prepare_qat_fx
from adaround_core.quant.quant_layers import quant_layers
from tasks.artifacts import Artifact, LayerResult
from tasks.datasets import first_line
from tasks.input_qparams import apply_input_qparams
from tasks.io import import_object, load_tensors
from tasks.params import PipelineParams
from tasks.pretrained import load_pretrained
from tasks.process_memo import ProcessMemo
from tasks.result_tensors import layer_tensors
from tasks.stage_data import open_data


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
    """A fresh float model from ``model.factory`` (its own weights: random, or those a
    loader factory loads)."""
    spec = params.model.factory
    try:
        model = import_object(spec)(**params.model.kwargs)
    except Exception as err:  # the user's code: any failure is the factory's
        raise ValueError(f"model.factory {spec!r} failed: {type(err).__name__}: "
                         f"{first_line(err)}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model.factory {spec!r} returned {type(model).__name__}, not a "
                         f"torch.nn.Module")
    return model


def initial_float_model(params: PipelineParams) -> nn.Module:
    """The factory's model with ``model.pretrained``'s weights when it is set."""
    model = build_float_model(params)
    if params.model.pretrained:
        load_pretrained(model, params.model.pretrained, params.model.factory)
    return model


def load_float_model(params: PipelineParams, checkpoint: Path) -> nn.Module:
    """The float model with the weights of ``checkpoint``, in eval mode, on the compute
    device."""
    model = build_float_model(params)
    model.load_state_dict(load_tensors(checkpoint))
    return model.to(compute_device(params)).eval()


def calibration_inputs(params: PipelineParams, dataset: Artifact) -> list[Any]:
    """The calibration batches (model inputs) of the dataset, on the compute device."""
    return open_data(params, dataset).calibration(compute_device(params))


_PREPARED: ProcessMemo[nn.Module] = ProcessMemo(kept=2)  # prepared models of this process


def prepared_key(params: PipelineParams, dataset: Artifact, float_model: Artifact,
                 checkpoint: Artifact) -> tuple:
    """What a prepared model is built from: the digests of its inputs and the settings
    that shape it (model, quantization, calibration, device)."""
    return (dataset.digest, float_model.digest, checkpoint.digest,
            params.digest("model", "quant", "calibration"), params.runtime.device)


def _prepared_model(params: PipelineParams, dataset: Artifact, float_model: Artifact,
                    checkpoint: Artifact) -> nn.Module:
    """A fresh copy of the prepared model with ``checkpoint``'s state. Preparing (BatchNorm
    folding runs a forward pass) costs more than copying and every layer's two tasks need
    it, so it is built once per process and inputs (keyed by digests, never mutated)."""

    def prepare() -> nn.Module:
        model = prepare_qat_fx(load_float_model(params, float_model.file), params.quant,
                               example_inputs=calibration_inputs(params, dataset)[0])
        model.load_state_dict(load_tensors(checkpoint.file))
        set_fake_quantize(model, FakeQuantState.VALIDATION)
        return model.eval()

    key = prepared_key(params, dataset, float_model, checkpoint)
    return copy.deepcopy(_PREPARED.get(key, prepare))


def calibrated_model(params: PipelineParams, dataset: Artifact, float_model: Artifact,
                     checkpoint: Artifact, rounded: Sequence[LayerResult] = ()) -> nn.Module:
    """The one way every task rebuilds a quantized model: the prepared model of ``params``
    with the qparams and weights of ``checkpoint`` (calibrated or rounded), the ``rounded``
    layer results written in, in VALIDATION state and eval mode, on the compute device."""
    model = _prepared_model(params, dataset, float_model, checkpoint)
    for result in rounded:
        apply_result(model, result)
    return model


def layer_models(params: PipelineParams, dataset: Artifact, float_model: Artifact,
                 calibrated: Artifact, previous: Sequence[LayerResult],
                 ) -> tuple[nn.Module, nn.Module]:
    """A layer's two models: the quantized model with the earlier layers rounded, and the
    float reference (taken before any rounding)."""
    model = calibrated_model(params, dataset, float_model, calibrated)
    reference = float_reference(model)
    for result in previous:
        apply_result(model, result)
    return model, reference


def apply_result(model: nn.Module, result: LayerResult) -> None:
    """Write a unit's result file into ``model``: each layer's rounded weight and, when
    AdaRound learned them, its input qparams."""
    tensors = load_tensors(Path(result.path))
    block = tuple(result.report.get("layers") or ())
    for name in block or (result.name,):
        own = layer_tensors(tensors, name, bool(block))
        if "weight" not in own:
            raise KeyError(f"result {result.path} holds no weight of layer {name!r}; delete "
                           f"it and rerun")
        apply_rounded_weight(model, name, own["weight"])
        apply_input_qparams(quant_layers(model)[name], name, own)


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
