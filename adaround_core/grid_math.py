"""The two in-place halves of a per-tensor fake quantization's grid arithmetic.

``fake_quantize`` (:mod:`adaround_core.quant.quant_math`) runs both on ``x * (1 / s)``;
a cached input's integer codes (:mod:`adaround_core.calibration.activation_codes`) are
the first half's result and are decoded with the second. One definition of each keeps the
decoded codes bit for bit equal to the fake-quantized tensor.
"""

from __future__ import annotations

import torch


def to_grid_(scaled: torch.Tensor, zero_point: torch.Tensor, qmin: int,
             qmax: int) -> torch.Tensor:
    """``scaled = x * (1 / s)`` turned into its grid index in place: round, ``+ z``,
    clamp to ``[qmin, qmax]``."""
    return scaled.round_().add_(zero_point).clamp_(qmin, qmax)


def from_grid_(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Grid index ``q`` (floating point) turned into its real value in place:
    ``(q - z) * s``."""
    return q.sub_(zero_point).mul_(scale)
