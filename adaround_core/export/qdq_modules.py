"""Stand-ins for a layer's fake quantizers while the model is exported to ONNX.

In PyTorch they compute exactly what the fake quantizers compute in VALIDATION; in the ONNX
graph they become ``QuantizeLinear`` → ``DequantizeLinear`` on a layer's input and an
integer weight initializer → ``DequantizeLinear`` on its weight. Their scales, zero points
and integer weights are buffers, so ONNX initializers carry the layer's name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from adaround_core.quant.fake_quantize import FakeQuantize
from adaround_core.quant.quant_layers import QuantLayerMixin, quant_layers
from adaround_core.quant.quant_math import channel_view, fake_quantize, quantize_to_int

UINT8_RANGE = (0, 255)  # the integer type that carries activations of up to 8 bits


class _QuantizeDequantize(torch.autograd.Function):
    """Per-tensor fake quantization; in ONNX ``QuantizeLinear`` (+ ``Clip`` for fewer than 8
    bits) + ``DequantizeLinear`` in uint8."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int):  # noqa: ANN001
        return fake_quantize(x, scale, zero_point.to(scale.dtype), qmin, qmax)

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin: int, qmax: int):  # noqa: ANN001
        q = g.op("QuantizeLinear", x, scale, zero_point)
        if (qmin, qmax) != UINT8_RANGE:
            low = g.op("Constant", value_t=torch.tensor(qmin, dtype=torch.uint8))
            high = g.op("Constant", value_t=torch.tensor(qmax, dtype=torch.uint8))
            q = g.op("Clip", q, low, high)
        return g.op("DequantizeLinear", q, scale, zero_point)


class _Dequantize(torch.autograd.Function):
    """An integer weight times its per-channel scale; in ONNX ``DequantizeLinear``."""

    @staticmethod
    def forward(ctx, q, scale, zero_point, axis: int):  # noqa: ANN001
        return (q.to(scale.dtype) - channel_view(zero_point, q, axis).to(scale.dtype)) \
            * channel_view(scale, q, axis)

    @staticmethod
    def symbolic(g, q, scale, zero_point, axis: int):  # noqa: ANN001
        return g.op("DequantizeLinear", q, scale, zero_point, axis_i=axis)


class ActivationQDQ(nn.Module):
    """The input quantizer of a layer, as exported."""

    def __init__(self, fq: FakeQuantize) -> None:
        super().__init__()
        self.qmin, self.qmax = fq.qmin, fq.qmax
        self.register_buffer("scale", fq.scale.detach().reshape(()).clone())
        self.register_buffer("zero_point", fq.zero_point.detach().reshape(()).to(torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantizeDequantize.apply(x, self.scale, self.zero_point, self.qmin, self.qmax)


class WeightDQ(nn.Module):
    """The weight quantizer of a layer, as exported: the integer weight and its scales."""

    def __init__(self, layer: QuantLayerMixin) -> None:
        super().__init__()
        fq, axis = layer.weight_fake_quant, layer.weight_axis
        weight = layer.weight.detach()
        zero = torch.zeros_like(fq.zero_point)
        self.axis = axis
        self.register_buffer("int_weight", integer_weight(weight, fq.scale, fq.qmin, fq.qmax,
                                                          axis))
        self.register_buffer("scale", fq.scale.detach().clone())
        self.register_buffer("zero_point", zero.to(torch.int8))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _Dequantize.apply(self.int_weight, self.scale, self.zero_point, self.axis)


def integer_weight(weight: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int,
                   axis: int) -> torch.Tensor:
    """``clamp(round(W / s), qmin, qmax)`` as int8 (the grid index of each weight)."""
    zero = torch.zeros_like(scale)
    grid = quantize_to_int(weight, channel_view(scale, weight, axis),
                           channel_view(zero, weight, axis), qmin, qmax)
    return grid.to(torch.int8)


@contextlib.contextmanager
def qdq_view(model: nn.Module) -> Iterator[dict[str, QuantLayerMixin]]:
    """Every quantized layer's fake quantizers replaced by their export stand-ins for the
    block (restored afterwards, also on error); yields the layers by name."""
    layers = quant_layers(model)
    saved = {name: (layer.input_fake_quant, layer.weight_fake_quant)
             for name, layer in layers.items()}
    try:
        for layer in layers.values():
            if isinstance(layer.input_fake_quant, FakeQuantize):
                layer.input_fake_quant = ActivationQDQ(layer.input_fake_quant)
            layer.weight_fake_quant = WeightDQ(layer)
        yield layers
    finally:
        for name, (input_fq, weight_fq) in saved.items():
            layers[name].input_fake_quant = input_fq
            layers[name].weight_fake_quant = weight_fq
