"""Calibration observers: they watch tensors and turn what they saw into qparams.

Activation observers (per tensor, affine): :class:`MinMaxObserver`,
:class:`PercentileObserver`, :class:`MSEObserver`. Weight observers (per output
channel, symmetric): :class:`WeightMinMaxObserver`, :class:`WeightMSEObserver`.
Every observer has ``observe(x)``, ``has_data`` and ``qparams(qmin, qmax)``.
"""

from __future__ import annotations

import torch
from torch import nn

from adaround_core.quant.quant_math import (
    ACTIVATION_CLIP_RATIOS,
    CLIP_SEARCH_STEPS,
    affine_qparams,
    channel_amax,
    fake_quantize,
    mse_symmetric_scale,
    symmetric_scale,
)

RESERVOIR_SIZE = 2**18  # values kept by sampling observers
PER_BATCH_SAMPLES = 2**15  # values drawn from each observed tensor


class MinMaxObserver(nn.Module):
    """Running minimum and maximum over every observed tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    @property
    def has_data(self) -> bool:
        return bool(torch.isfinite(self.min_val))

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        self.min_val.copy_(torch.minimum(self.min_val, x.min().to(self.min_val)))
        self.max_val.copy_(torch.maximum(self.max_val, x.max().to(self.max_val)))

    def qparams(self, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
        return affine_qparams(self.min_val, self.max_val, qmin, qmax)


class _ReservoirObserver(MinMaxObserver):
    """Min/max plus a bounded random sample of observed values (fixed seed)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self._observed = 0  # tensors seen so far; with ``seed`` it fixes the sampling
        self._reservoir = torch.empty(0)

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        generator = torch.Generator().manual_seed(self.seed + self._observed)
        self._observed += 1
        flat = x.detach().flatten().float().cpu()
        if flat.numel() > PER_BATCH_SAMPLES:
            idx = torch.randint(flat.numel(), (PER_BATCH_SAMPLES,), generator=generator)
            flat = flat[idx]
        self._reservoir = torch.cat([self._reservoir, flat])
        if self._reservoir.numel() > RESERVOIR_SIZE:
            keep = torch.randperm(self._reservoir.numel(), generator=generator)
            self._reservoir = self._reservoir[keep[:RESERVOIR_SIZE]]

    def _reservoir_or_minmax(self) -> torch.Tensor:
        if self._reservoir.numel() == 0:  # restored from a checkpoint: only min/max survive
            return torch.stack([self.min_val, self.max_val]).float().cpu()
        return self._reservoir


class PercentileObserver(_ReservoirObserver):
    """Clips the range to the ``(100 - p, p)`` percentiles of the observed values."""

    def __init__(self, percentile: float = 99.99, seed: int = 0) -> None:
        super().__init__(seed)
        self.percentile = percentile

    def qparams(self, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
        values = self._reservoir_or_minmax()
        q = torch.tensor([1.0 - self.percentile / 100.0, self.percentile / 100.0])
        lo, hi = torch.quantile(values, q)
        return affine_qparams(lo.to(self.min_val), hi.to(self.max_val), qmin, qmax)


class MSEObserver(_ReservoirObserver):
    """Chooses the clipping range that minimises the fake-quantization MSE."""

    def __init__(self, grid: int = CLIP_SEARCH_STEPS, seed: int = 0) -> None:
        super().__init__(seed)
        self.grid = grid

    def qparams(self, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
        values = self._reservoir_or_minmax()
        lo, hi = self.min_val.float().cpu(), self.max_val.float().cpu()
        best = (float("inf"), lo, hi)
        for ratio in torch.linspace(*ACTIVATION_CLIP_RATIOS, self.grid).tolist():
            scale, zp = affine_qparams(lo * ratio, hi * ratio, qmin, qmax)
            err = (fake_quantize(values, scale, zp, qmin, qmax) - values).pow(2).mean().item()
            if err < best[0]:
                best = (err, lo * ratio, hi * ratio)
        return affine_qparams(best[1].to(self.min_val), best[2].to(self.max_val), qmin, qmax)


class WeightMinMaxObserver(nn.Module):
    """Per-channel absolute maximum of the latest observed weight."""

    def __init__(self, axis: int = 0) -> None:
        super().__init__()
        self.axis = axis
        self._weight: torch.Tensor | None = None

    @property
    def has_data(self) -> bool:
        return self._weight is not None

    def observe(self, weight: torch.Tensor) -> None:
        self._weight = weight.detach()

    def qparams(self, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
        scale = symmetric_scale(channel_amax(self._weight, self.axis), qmin, qmax)
        return scale, torch.zeros_like(scale)


class WeightMSEObserver(WeightMinMaxObserver):
    """Per-channel symmetric scale searched to minimise the weight's rounding error."""

    def qparams(self, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
        scale = mse_symmetric_scale(self._weight, self.axis, qmin, qmax)
        return scale, torch.zeros_like(scale)


ACTIVATION_OBSERVERS = {"minmax": MinMaxObserver, "mse": MSEObserver, "percentile": PercentileObserver}
WEIGHT_OBSERVERS = {"minmax": WeightMinMaxObserver, "mse": WeightMSEObserver}
