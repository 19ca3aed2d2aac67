"""AdaRound's rounding variable of one layer, differentiated by autograd.

Block reconstruction optimises the ``V`` of several layers jointly through whatever the
block computes between them, so its gradient comes from autograd, through the equations of
:mod:`~adaround_core.reconstruction.adaround_math` (the same loss as the layer path's
hand-written gradient in :mod:`~adaround_core.reconstruction.soft_rounding`).
"""

from __future__ import annotations

import torch

from adaround_core.quant.quant_layers import QuantLayerMixin
from adaround_core.reconstruction.adaround_math import (
    hard_quantized_weight,
    init_rounding_variable,
    rectified_sigmoid,
    rounding_regularizer,
    soft_quantized_weight,
    split_on_grid,
)


class LayerRounding:
    """``V`` of one layer (a leaf tensor for an optimizer) on its frozen weight grid.

    Call :meth:`start_step` once per optimisation step: ``h(V)`` is computed there once
    and shared by the soft weight (however often the layer is called) and the regulariser.
    """

    def __init__(self, layer: QuantLayerMixin) -> None:
        self.scale, self.qmin, self.qmax = layer.weight_qparams()
        self.w_floor, rest = split_on_grid(layer.weight.detach(), self.scale)
        self.v = init_rounding_variable(rest).requires_grad_(True)
        self._h: torch.Tensor | None = None

    def start_step(self) -> None:
        """Compute this step's ``h(V)`` (in the autograd graph of the step)."""
        self._h = rectified_sigmoid(self.v)

    def soft_weight(self, _weight: torch.Tensor | None = None) -> torch.Tensor:
        """``W~ = s * clamp(W_floor + h(V), qmin, qmax)`` (the argument, the float weight
        a weight fake-quant would receive, is ignored)."""
        return soft_quantized_weight(self.w_floor, self._h, self.scale, self.qmin, self.qmax)

    def regularizer(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2 h(V) - 1| ^ beta)``."""
        return rounding_regularizer(self._h, beta)

    @torch.no_grad()
    def hard_weight(self) -> torch.Tensor:
        """``s * clamp(W_floor + [V >= 0], qmin, qmax)``, exactly on the grid."""
        self._h = None
        return hard_quantized_weight(self.w_floor, self.v, self.scale, self.qmin, self.qmax)
