"""``export_quantized``: a calibrated, rounded model as an ONNX QDQ model, AIMET-style
encodings and integer weights.

The ONNX model holds each quantized layer's weight as an int8 initializer named like the
PyTorch parameter (``conv1.weight``: exactly the learned rounding, ``round(W / s)``) feeding a
per-output-channel ``DequantizeLinear``, and each quantized activation (a layer's input) as a
``QuantizeLinear``/``DequantizeLinear`` pair in uint8 with its calibrated scale and zero point
(a ``Clip`` keeps fewer than 8 bits in range). W2–W8 weights are carried in int8 and A2–A8
activations in uint8: narrower ONNX types (int4) are not run end to end by ONNX Runtime's CPU
provider. BatchNorms are folded already (``prepare_qat_fx``).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from adaround_core.export.encodings import activation_encoding, encodings_file, weight_encodings
from adaround_core.export.export_failure import UNSUPPORTED, unsupported_error
from adaround_core.export.qdq_modules import qdq_view
from adaround_core.quant.fake_quantize import FakeQuantize, FakeQuantState
from adaround_core.quant.model_modes import eval_mode, fake_quant_state
from adaround_core.quant.quant_layers import QuantLayerMixin, quant_layers

MIN_OPSET = 13  # per-channel DequantizeLinear (its axis attribute)
DEFAULT_OPSET = 17
MAX_ACTIVATION_BITS = 8  # uint8 QDQ; 9-16 bits need uint16 (opset 21)


@dataclass(frozen=True)
class ExportedModel:
    """The ONNX model, the encodings and the integer tensors of one export."""

    onnx_model: onnx.ModelProto
    encodings: dict[str, Any]
    integer_tensors: dict[str, torch.Tensor]


def export_quantized(model: nn.Module, example_inputs: Any, opset: int = DEFAULT_OPSET,
                     allow_nearest: bool = False) -> ExportedModel:
    """Export ``model`` (from ``prepare_qat_fx``, calibrated and rounded by
    ``weight_reconstruction``; layers it left out export their nearest rounding) for one
    example batch (a tensor, a tuple of positional arguments or a dict of keyword
    arguments). The model is left as it was."""
    layers = _checked_layers(model, opset, allow_nearest)
    example = call_args(in_signature_order(model, example_inputs))
    with eval_mode(model), fake_quant_state(model, FakeQuantState.FLOAT), qdq_view(model):
        try:
            proto = _trace_to_onnx(model, example, opset)
        except UNSUPPORTED as err:  # name the module that uses the operator
            raise unsupported_error(model, example_inputs, opset, err) from None
        integers = _integer_tensors(layers)
    names = _rename_weight_initializers(proto, layers)
    encodings = _encodings(proto, layers, names)
    onnx.checker.check_model(proto)
    return ExportedModel(proto, encodings, integers)


def in_signature_order(model: nn.Module, example_inputs: Any) -> Any:
    """A dict input with its keys in the order of ``model.forward``'s parameters (the order
    the exporter gives the graph's inputs); any other input as it is."""
    if not isinstance(example_inputs, dict):
        return example_inputs
    order = [n for n in inspect.signature(model.forward).parameters if n in example_inputs]
    return {k: example_inputs[k] for k in order + [k for k in example_inputs if k not in order]}


def input_feed(example_inputs: Any) -> dict[str, torch.Tensor]:
    """The graph-input name of each tensor of a model input: ``input_<i>`` for positional
    tensors, the key for a dict's tensor (``<key>_<j>`` for a nested value's tensors)."""
    args = call_args(example_inputs)
    kwargs = args[-1] if args and isinstance(args[-1], dict) else {}
    positional = args[:-1] if kwargs else args
    feed = {f"input_{i}": t for i, t in enumerate(_tensors(positional))}
    for key, value in kwargs.items():
        tensors = _tensors(value)
        if isinstance(value, torch.Tensor):
            feed[str(key)] = value
        else:
            feed.update({f"{key}_{j}": t for j, t in enumerate(tensors)})
    return feed


def call_args(example_inputs: Any) -> tuple:
    """``torch.onnx.export``'s positional ``args`` for a model input as ``call_model`` takes it."""
    if isinstance(example_inputs, dict):
        return (example_inputs,)  # a trailing dict is passed as keyword arguments
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def _checked_layers(model: nn.Module, opset: int,
                    allow_nearest: bool) -> dict[str, QuantLayerMixin]:
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too low: per-channel DequantizeLinear of the int8 "
                         f"weights needs opset {MIN_OPSET} or later")
    layers = quant_layers(model)
    if not layers:
        raise ValueError("the model was never prepared: call prepare_qat_fx, calibrate and "
                         "round it (weight_reconstruction) before exporting")
    for name, layer in layers.items():
        fq = layer.input_fake_quant
        if isinstance(fq, FakeQuantize) and not fq.has_qparams:
            raise ValueError(f"layer {name!r} was never calibrated (no activation scale): "
                             f"calibrate the model before exporting")
        if isinstance(fq, FakeQuantize) and fq.pending:
            raise ValueError(f"layer {name!r} has statistics not yet turned into scales: "
                             f"set_fake_quantize(model, FakeQuantState.VALIDATION) first")
        if isinstance(fq, FakeQuantize) and fq.qmax > 2**MAX_ACTIVATION_BITS - 1:
            raise ValueError(f"layer {name!r} has activations of more than "
                             f"{MAX_ACTIVATION_BITS} bits: the export carries activations in "
                             f"uint8; use activation_bits <= {MAX_ACTIVATION_BITS}")
        if not layer.weight_fake_quant.has_qparams:
            raise ValueError(f"layer {name!r} has no weight scale: calibrate the model "
                             f"before exporting")
    rounded = [name for name, layer in layers.items() if bool(layer.weight_fake_quant.frozen)]
    if not allow_nearest and not rounded:
        raise ValueError("no layer was rounded: run weight_reconstruction first, or pass "
                         "allow_nearest=True to export nearest rounding")
    return layers


def _trace_to_onnx(model: nn.Module, args: tuple, opset: int) -> onnx.ModelProto:
    """TorchScript-based export: our QDQ stand-ins define their own ONNX symbolics."""
    import io

    buffer = io.BytesIO()
    inputs = list(input_feed(args))
    with torch.no_grad():
        outputs = [f"output_{i}" for i in range(len(_tensors(_call(model, args))))]
    batch_axes = {name: {0: "batch"} for name in inputs + outputs}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
        torch.onnx.export(model, args, buffer, dynamo=False, opset_version=opset,
                          input_names=inputs, output_names=outputs, dynamic_axes=batch_axes,
                          do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())


def _call(model: nn.Module, args: tuple) -> Any:
    """``model`` called as ``torch.onnx.export`` calls it (a trailing dict: keyword args)."""
    if args and isinstance(args[-1], dict):
        return model(*args[:-1], **args[-1])
    return model(*args)


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) input or output, in order."""
    from adaround_core.torch_private import tree_leaves

    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def _integer_tensors(layers: dict[str, QuantLayerMixin]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        weight = layer.weight_fake_quant
        tensors[f"{name}.weight.int"] = weight.int_weight.clone()
        tensors[f"{name}.weight.scale"] = weight.scale.clone()
        act = layer.input_fake_quant
        if hasattr(act, "zero_point"):
            tensors[f"{name}.input.scale"] = act.scale.reshape(1).clone()
            tensors[f"{name}.input.zero_point"] = act.zero_point.reshape(1).clone()
    return tensors


def _rename_weight_initializers(proto: onnx.ModelProto,
                                layers: dict[str, QuantLayerMixin]) -> dict[str, str]:
    """Name each int8 weight initializer like the PyTorch parameter; returns layer -> name."""
    renames = {f"{name}.weight_fake_quant.int_weight": f"{name}.weight" for name in layers}
    for init in proto.graph.initializer:
        if init.name in renames:
            init.name = renames[init.name]
    for node in proto.graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
    present = {init.name for init in proto.graph.initializer}
    return {name: f"{name}.weight" for name in layers if f"{name}.weight" in present}


def _encodings(proto: onnx.ModelProto, layers: dict[str, QuantLayerMixin],
               weights: dict[str, str]) -> dict[str, Any]:
    """AIMET-style encodings keyed by ONNX tensor names."""
    activations = {}
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[1].endswith(".input_fake_quant.scale"):
            layer = node.input[1][: -len(".input_fake_quant.scale")]
            activations[node.input[0]] = [activation_encoding(layers[layer].input_fake_quant)]
    params = {weights[name]: weight_encodings(layer) for name, layer in layers.items()
              if name in weights}
    return encodings_file(activations, params)


def run_onnx_inputs(example_inputs: Any, proto: onnx.ModelProto) -> dict[str, Any]:
    """ONNX Runtime's feed for ``example_inputs``: each graph input by name (an input the
    graph does not use is not one of them)."""
    feed = input_feed(example_inputs)
    return {i.name: feed[i.name].detach().cpu().numpy() for i in proto.graph.input}


def save_exported(exported: ExportedModel, onnx_path: Path, encodings_path: Path,
                  integers_path: Path) -> None:
    """Write the three files (atomic replacement is the caller's concern)."""
    import json

    from safetensors.torch import save_file

    onnx.save(exported.onnx_model, str(onnx_path))
    Path(encodings_path).write_text(json.dumps(exported.encodings, indent=2, sort_keys=True))
    save_file({k: v.contiguous() for k, v in exported.integer_tensors.items()},
              str(integers_path))
