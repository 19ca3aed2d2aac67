"""The activation fake-quants of a unit while it is reconstructed: QDrop and learned scales.

Each quantized layer of the unit fake-quantizes its input; while the unit is optimised,
those quantizers compute instead (through :attr:`FakeQuantize.substitute`):

* with ``activation_lr``, fake quantization with a learned scale (LSQ gradient,
  :mod:`~adaround_core.quant.lsq`), one Adam step per optimisation step, at a learning rate
  of ``activation_lr`` times the quantizer's calibrated scale;
* with ``drop_prob`` > 0, QDrop (:mod:`~adaround_core.quant.qdrop`): each element passes
  its float value instead with probability ``drop_prob``.

Held-out evaluation uses the learned scales without dropping. The learned scales go into
the quantizers for good (frozen, like a rounded weight's scale) only when the unit keeps its
learned state (:mod:`~.unit_state`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from adaround_core.quant.fake_quantize import FakeQuantize, substituted
from adaround_core.quant.lsq import lsq_fake_quantize
from adaround_core.quant.qdrop import qdrop, qdrop_generator
from adaround_core.quant.quant_math import SCALE_EPS, fake_quantize
from adaround_core.reconstruction.reconstruction_config import AdaRoundConfig
from adaround_core.reconstruction.soft_rounding import FusedAdam, step_all


class UnitActivations:
    """The input quantizers of a unit's layers, as trained by ``cfg``."""

    def __init__(self, quantizers: list[FakeQuantize], cfg: AdaRoundConfig, unit: str,
                 device: torch.device) -> None:
        self.quantizers = list(dict.fromkeys(quantizers))  # a layer called twice: once
        self.drop_prob = cfg.drop_prob
        self.generator = qdrop_generator(cfg.seed, unit, device) if cfg.drop_prob > 0 else None
        learn = cfg.activation_lr is not None
        self.scales = {fq: fq.scale.detach().clone().requires_grad_(True)
                       for fq in self.quantizers if learn and fq.axis is None}
        # Adam moves a parameter by about its learning rate per step, whatever the gradient's
        # size: a rate relative to each calibrated scale gives every quantizer the same
        # relative pace (8-bit scales are orders of magnitude smaller than 4-bit ones)
        self._adams = [(scale, FusedAdam(scale, cfg.activation_lr * float(scale.detach().max())))
                       for scale in self.scales.values()]

    def _quantize(self, fq: FakeQuantize, x: torch.Tensor, training: bool) -> torch.Tensor:
        if fq in self.scales:
            quantized = lsq_fake_quantize(x, self.scales[fq], fq.zero_point, fq.qmin, fq.qmax)
        else:
            quantized = fake_quantize(x, fq.scale, fq.zero_point, fq.qmin, fq.qmax, fq.axis)
        if training and self.generator is not None:
            return qdrop(x, quantized, self.drop_prob, self.generator)
        return quantized

    def substitutes(self, training: bool) -> dict:
        """``FakeQuantize.substitute`` of each quantizer (dropping only when ``training``)."""
        return {fq: (lambda x, fq=fq: self._quantize(fq, x, training)) for fq in self.quantizers}

    @contextlib.contextmanager
    def active(self, training: bool) -> Iterator[None]:
        with substituted(self.substitutes(training)):
            yield

    @torch.no_grad()
    def step(self) -> None:
        """One Adam step of the learned scales (kept positive)."""
        step_all(self._adams)
        for scale in self.scales.values():
            scale.clamp_(min=SCALE_EPS)
