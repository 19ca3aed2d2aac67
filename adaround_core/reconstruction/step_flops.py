"""FLOPs of one AdaRound step on a layer, counted from its weight and input shapes.

One step runs the layer forward on a batch with the soft weight ``W~`` and takes the
gradient of the loss with respect to ``W~`` only (the input is data, so no input
gradient is computed). Both are one GEMM-sized product of the same size: a forward
costs ``2 * weight.numel() * positions`` FLOPs (one multiply-add per weight element
per output position; per *input* position for a transposed convolution), and the
weight gradient ``dW = dY^T X`` costs the same again. Elementwise work (soft rounding,
regulariser, Adam) is proportional to the weight alone and is not counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

FLOPS_PER_MAC = 2
GEMMS_PER_STEP = 2  # the forward and the weight gradient


def forward_flops(layer: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of ``layer``'s forward on an input of ``input_shape`` (batch included)."""
    return FLOPS_PER_MAC * layer.weight.numel() * _positions(layer, tuple(input_shape))


def step_flops(layer: nn.Module, row_shape: Sequence[int], batch_size: int) -> int:
    """FLOPs of one AdaRound step: forward and weight gradient on ``batch_size`` rows of
    ``row_shape`` (one row = one sample, dim 0 of the captured input)."""
    return GEMMS_PER_STEP * forward_flops(layer, (batch_size, *row_shape))


class LargestCall:
    """Inside its ``with`` block, the FLOPs of the largest forward call of ``layers`` so
    far (:attr:`flops`): what sizes the ops of capturing their inputs."""

    def __init__(self, layers: Iterable[nn.Module]) -> None:
        self.layers, self.flops = list(layers), 0
        self._handles: list[Any] = []

    def __enter__(self) -> LargestCall:
        self._handles = [layer.register_forward_pre_hook(self._measure) for layer in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _measure(self, layer: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            self.flops = max(self.flops, forward_flops(layer, args[0].shape))


def _positions(layer: nn.Module, shape: tuple[int, ...]) -> int:
    """How many times each weight element is used in one forward."""
    if isinstance(layer, nn.Linear):
        return math.prod(shape) // shape[-1]
    if isinstance(layer, nn.modules.conv._ConvNd):
        dims = len(layer.kernel_size)
        batch = math.prod(shape[:-dims - 1])  # 1 for an unbatched input
        spatial = shape[-dims:] if layer.transposed else _conv_output_size(layer, shape[-dims:])
        return batch * math.prod(spatial)
    raise TypeError(f"no FLOP count for {type(layer).__name__}")


def _conv_output_size(layer: nn.modules.conv._ConvNd, size: tuple[int, ...]) -> tuple[int, ...]:
    """Spatial output size of a (non-transposed) convolution."""
    if layer.padding == "same":
        return size
    padding = (0,) * len(size) if layer.padding == "valid" else layer.padding
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                 zip(size, padding, layer.dilation, layer.kernel_size, layer.stride, strict=True))
