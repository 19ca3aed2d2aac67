"""Pure fake-quantization math: integer ranges, scales, zero points, rounding.

Every function here is stateless and works on any device. The formulas match
``torch.fake_quantize_per_channel_affine`` / ``per_tensor_affine`` bit for bit:
``q = clamp(round(x * (1 / s)) + z, qmin, qmax)``, ``x_hat = (q - z) * s``.
"""

from __future__ import annotations

import torch

from adaround_core.grid_math import from_grid_, to_grid_

SCALE_EPS = 1e-8  # smallest scale; avoids division by zero for all-zero channels
# Clipping searches of the MSE observers: ratios of the observed range, from the full
# range down, in CLIP_SEARCH_STEPS evenly spaced steps.
CLIP_SEARCH_STEPS = 100
WEIGHT_CLIP_RATIOS = (1.0, 0.2)  # of each channel's absolute maximum (weights)
ACTIVATION_CLIP_RATIOS = (1.0, 0.1)  # of the observed [min, max] (activations)


def symmetric_qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of a symmetric ``bits``-bit quantizer: [-2^(b-1), 2^(b-1) - 1]."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def unsigned_qrange(bits: int) -> tuple[int, int]:
    """Unsigned integer range of an affine ``bits``-bit quantizer: [0, 2^b - 1]."""
    return 0, 2**bits - 1


def channel_view(values: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    """Reshape per-channel ``values`` so they broadcast against ``like`` along ``axis``."""
    shape = [1] * like.dim()
    shape[axis] = -1
    return values.reshape(shape)


def quantize_to_int(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Integer grid index (as float) of ``x``: ``clamp(round(x / s) + z, qmin, qmax)``."""
    return torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Real value of grid index ``q``: ``(q - z) * s``."""
    return (q - zero_point) * scale


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Round-to-nearest fake quantization, per tensor (``axis=None``) or per channel.

    Without autograd the same formula runs in place on one new tensor: the forward passes
    of calibration, capture and evaluation spend much of their time here, and at 224 px
    five fresh tensors per call (or torch's fused kernel, which is not vectorised and also
    writes a mask) cost 2-3x as much."""
    if axis is not None:
        scale = channel_view(scale, x, axis)
        zero_point = channel_view(zero_point, x, axis)
    if not _needs_grad(x, scale, zero_point) and _keeps_dtype(x, scale, zero_point):
        return _fake_quantize_in_place(x, scale, zero_point, qmin, qmax)
    return dequantize(quantize_to_int(x, scale, zero_point, qmin, qmax), scale, zero_point)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _keeps_dtype(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> bool:
    """Whether adding ``zero_point`` in place keeps the dtype the formula would give."""
    dtype = torch.result_type(x, scale)
    return torch.promote_types(dtype, zero_point.dtype) == dtype


def _fake_quantize_in_place(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                            qmin: int, qmax: int) -> torch.Tensor:
    """:func:`quantize_to_int` then :func:`dequantize`, the same operations in the same
    order, written into one tensor; a large contiguous tensor with one scale and zero
    point chunk by chunk (:data:`FAKE_QUANT_CHUNK`), all six operations on a chunk while
    it is in the CPU's cache rather than six passes over memory (on a 224-px batch
    ``bench/bench_capture_ops.py`` measured 13-14 ms against 15-25 ms whole)."""
    inverse = 1.0 / scale
    if not _chunkable(x, scale, zero_point):
        return _finish(torch.mul(x, inverse), scale, zero_point, qmin, qmax)
    out = torch.empty(x.shape, dtype=torch.result_type(x, inverse), device=x.device)
    for source, chunk in zip(x.view(-1).split(FAKE_QUANT_CHUNK),
                             out.view(-1).split(FAKE_QUANT_CHUNK), strict=True):
        _finish(torch.mul(source, inverse, out=chunk), scale, zero_point, qmin, qmax)
    return out


# Elements per chunk of an in-place fake quantization (4 MiB of float32: the chunk and its
# source stay in the last-level cache; smaller chunks pay per-op dispatch). The gain over
# whole tensors is modest and varies between runs (1.1-1.9x, best of 7, on the benchmark
# machine's 224-px activations).
FAKE_QUANT_CHUNK = 1 << 20


def _chunkable(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> bool:
    """Whether ``x`` is a large contiguous CPU tensor with one scale and zero point (so
    each chunk of its flat view is quantized with the same numbers)."""
    return (x.device.type == "cpu" and x.numel() > FAKE_QUANT_CHUNK and x.is_contiguous()
            and scale.numel() == 1 and zero_point.numel() == 1
            and torch.broadcast_shapes(x.shape, scale.shape, zero_point.shape) == x.shape)


def _finish(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
            qmax: int) -> torch.Tensor:
    """The rest of :func:`_fake_quantize_in_place` on ``q = x / scale``, in place."""
    return from_grid_(to_grid_(q, zero_point, qmin, qmax), scale, zero_point)


def symmetric_scale(amax: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Scale mapping ``[-amax, amax]`` onto the symmetric range (torch.ao's convention)."""
    return (amax / ((qmax - qmin) / 2)).clamp_min(SCALE_EPS)


def affine_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, qmin: int, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering ``[min_val, max_val]`` (widened to contain 0)."""
    min_val = torch.clamp(min_val, max=0.0)
    max_val = torch.clamp(max_val, min=0.0)
    scale = ((max_val - min_val) / (qmax - qmin)).clamp_min(SCALE_EPS)
    zero_point = torch.clamp(qmin - torch.round(min_val / scale), qmin, qmax)
    return scale, zero_point


def channel_amax(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """Largest absolute value of each channel of ``weight`` along ``axis``."""
    dims = [d for d in range(weight.dim()) if d != axis]
    return weight.detach().abs().amax(dim=dims) if dims else weight.detach().abs()


def mse_symmetric_scale(
    weight: torch.Tensor, axis: int, qmin: int, qmax: int, grid: int = CLIP_SEARCH_STEPS
) -> torch.Tensor:
    """Per-channel symmetric scale minimising the squared rounding error of ``weight``.

    Searches clipping ratios in ``(0, 1]`` of each channel's absolute maximum.
    """
    w = weight.detach()
    amax = channel_amax(w, axis)
    dims = [d for d in range(w.dim()) if d != axis]
    zero = torch.zeros_like(amax)
    best_err = torch.full_like(amax, float("inf"))
    best_scale = symmetric_scale(amax, qmin, qmax)
    for ratio in torch.linspace(*WEIGHT_CLIP_RATIOS, grid).tolist():
        scale = symmetric_scale(amax * ratio, qmin, qmax)
        err = (fake_quantize(w, scale, zero, qmin, qmax, axis) - w).pow(2)
        err = err.sum(dim=dims) if dims else err
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale
