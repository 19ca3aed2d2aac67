"""Learned step size (LSQ, Esser et al., ICLR 2020) for per-tensor activation fake-quants.

``lsq_fake_quantize`` is the usual fake quantization ``(clamp(round(x / s) + z, qmin,
qmax) - z) * s`` with LSQ's gradients (round taken as the identity, the straight-through
estimator): with ``v = round(x / s) + z`` and ``inside = qmin <= v <= qmax``,

    dL/dx = dL/dy * inside
    dL/ds = g * sum(dL/dy * (inside ? round(x / s) - x / s : clamp(v, qmin, qmax) - z))

where ``g = 1 / sqrt(x.numel() * qmax)`` is LSQ's gradient scale, which keeps the scale's
update of the same order as the weights' whatever the tensor size. The zero point stays
fixed. The bounds are inclusive, as autograd's clamp gradient is.
"""

from __future__ import annotations

import math

import torch

from adaround_core.quant.quant_math import dequantize


def lsq_grad_scale(numel: int, qmax: int) -> float:
    """LSQ's scale-gradient factor ``1 / sqrt(numel * qmax)``."""
    return 1.0 / math.sqrt(max(numel, 1) * max(qmax, 1))


class _LsqFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                qmin: int, qmax: int) -> torch.Tensor:
        scaled = x * (1.0 / scale)
        rounded = torch.round(scaled)
        v = rounded + zero_point
        q = torch.clamp(v, qmin, qmax)
        ctx.save_for_backward(scaled, rounded, v, q, zero_point)
        ctx.bounds, ctx.grad_scale = (qmin, qmax), lsq_grad_scale(x.numel(), qmax)
        ctx.scale_shape = scale.shape
        return dequantize(q, scale, zero_point)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        scaled, rounded, v, q, zero_point = ctx.saved_tensors
        qmin, qmax = ctx.bounds
        inside = (v >= qmin) & (v <= qmax)
        grad_x = grad_output * inside
        d_scale = torch.where(inside, rounded - scaled, q - zero_point)
        grad_scale = (grad_output * d_scale).sum().reshape(ctx.scale_shape) * ctx.grad_scale
        return grad_x, grad_scale, None, None, None


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                      qmin: int, qmax: int) -> torch.Tensor:
    """Per-tensor fake quantization of ``x`` with a learnable ``scale`` (shape ``[1]``)."""
    return _LsqFakeQuantize.apply(x, scale, zero_point, qmin, qmax)
