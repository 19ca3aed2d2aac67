"""A fake-quantized activation kept as its integer grid indices (1 byte a value, not 4).

A layer's cached input is the output of its per-tensor 8-bit input quantizer: every value
is ``(q - z) * s`` for an integer ``q`` in ``[qmin, qmax]``. :func:`integer_codes` computes
``q`` as :func:`~adaround_core.quant.quant_math.fake_quantize` does (``x * (1 / s)``, then
:func:`~adaround_core.grid_math.to_grid_`) and :meth:`ActivationCodes.decode` finishes with
its :func:`~adaround_core.grid_math.from_grid_` on the same float32 values, so the decoded
tensor equals the fake-quantized one bit for bit; the capture writes a quarter of the bytes
and skips the last two operations.
Where that could not hold (NaN values, a range wider than 8 bits, per-channel qparams, a
dtype other than float32) there are no codes and the float tensor is cached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adaround_core.calibration.checksum import shares_storage
from adaround_core.grid_math import from_grid_, to_grid_

DECODED_DTYPE = torch.float32  # what codes decode to (the only dtype they are taken of)
CHUNK = 1 << 20  # elements computed at a time (4 MiB of float32 stays in the CPU's cache)


@dataclass
class ActivationCodes:
    """Integer grid indices ``codes`` of a fake-quantized float32 tensor with one
    ``scale`` and ``zero_point`` (float32 tensors of one element)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def decode(self) -> torch.Tensor:
        """The fake-quantized tensor, bit for bit."""
        return decode(self.codes, self.scale, self.zero_point)


def code_dtype(qmin: int, qmax: int) -> torch.dtype | None:
    """The 8-bit integer dtype that holds every grid index in ``[qmin, qmax]``, if any."""
    if 0 <= qmin and qmax <= 255:
        return torch.uint8
    if -128 <= qmin and qmax <= 127:
        return torch.int8
    return None


def integer_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                  qmin: int, qmax: int) -> ActivationCodes | None:
    """The grid indices of the per-tensor fake quantization of ``x``, or None where the
    decoded codes could differ from it (see the module's docstring)."""
    dtype = code_dtype(qmin, qmax)
    if (dtype is None or x.dtype != DECODED_DTYPE or scale.numel() != 1
            or zero_point.numel() != 1 or scale.dtype != DECODED_DTYPE
            or zero_point.dtype != DECODED_DTYPE):
        return None
    inverse = 1.0 / scale
    source = x.detach().contiguous().view(-1)
    codes = torch.empty(x.shape, dtype=dtype, device=x.device)
    work = torch.empty(min(CHUNK, source.numel()), dtype=DECODED_DTYPE, device=x.device)
    for part, out in zip(source.split(CHUNK), codes.view(-1).split(CHUNK), strict=True):
        q = to_grid_(torch.mul(part, inverse, out=work[:part.numel()]), zero_point, qmin, qmax)
        if q.sum().isnan():  # a NaN stays NaN through the clamp (and a sum is cheaper
            return None  # than isnan's mask)
        out.copy_(q)
    return ActivationCodes(codes, scale.detach().clone(), zero_point.detach().clone())


def input_codes(layer: nn.Module, x: torch.Tensor) -> ActivationCodes | None:
    """The codes of ``layer``'s input quantizer on ``x`` (its ``input_fake_quant.codes``),
    or None where it has no such quantizer or gives none."""
    quantizer: Any = getattr(layer, "input_fake_quant", None)
    codes = getattr(quantizer, "codes", None)
    return codes(x) if callable(codes) else None


def cached_input(layer: nn.Module, arg: torch.Tensor, quantize: bool = True,
                 codes: bool = False,
                 own: Callable[[torch.Tensor], torch.Tensor] = torch.Tensor.clone,
                 ) -> torch.Tensor | ActivationCodes:
    """What a layer's cache holds of its input ``arg``: a copy of ``arg`` when its
    activation fake-quant is not applied (``quantize`` False); else, with ``codes``, the
    integer codes of its quantizer where it gives them; else the fake-quantized tensor
    (``own`` of it where it shares ``arg``'s storage: the pass runs on and may change it)."""
    if not quantize:
        return arg.detach().clone()
    with torch.no_grad():
        encoded = input_codes(layer, arg) if codes else None
        if encoded is not None:
            return encoded
        x = layer.input_fake_quant(arg).detach()
    return own(x) if shares_storage(x, arg) else x


def decode(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
           ) -> torch.Tensor:
    """``(q - z) * s`` in :data:`DECODED_DTYPE`: the end of the fake quantization that
    gave ``codes``."""
    return from_grid_(codes.to(DECODED_DTYPE), scale, zero_point)
