"""AdaRound's rounding variable of one layer inside a unit optimised through autograd.

The unit (a block, or a layer whose activation quantizer is trained) is differentiated by
autograd only up to each layer's weight: every step, the layer's soft weight ``W~(V)`` is
computed by :class:`~adaround_core.reconstruction.soft_rounding.SoftRounding` and handed to
the layer as a leaf tensor; after the backward pass its gradient ``dL/dW~`` (summed over the
layer's calls) goes through the layer path's hand-written chain rule, regulariser included,
into one fused Adam step on ``V``. The math per layer is thus the layer path's exactly, and
the elementwise work on large weights stays as cheap as there.
"""

from __future__ import annotations

import torch

from adaround_core.quant.quant_layers import QuantLayerMixin
from adaround_core.reconstruction.soft_rounding import FusedAdam, SoftRounding


class LayerRounding:
    """``V`` of one layer on its frozen weight grid, with its Adam state (``lr``)."""

    def __init__(self, layer: QuantLayerMixin, lr: float) -> None:
        scale, qmin, qmax = layer.weight_qparams()
        self._rounding = SoftRounding(layer.weight, scale, qmin, qmax)
        self._adam = FusedAdam(self._rounding.v, lr)
        self._weight: torch.Tensor | None = None

    def start_step(self) -> None:
        """Compute this step's soft weight, as a leaf whose gradient the step collects."""
        self._weight = self._rounding.update_soft_weight().detach().requires_grad_(True)

    def soft_weight(self, _weight: torch.Tensor | None = None) -> torch.Tensor:
        """This step's ``W~ = s * clamp(W_floor + h(V), qmin, qmax)`` (the argument, the
        float weight a weight fake-quant would receive, is ignored)."""
        return self._weight

    @torch.no_grad()
    def step(self, reg_weight: float, beta: float | None) -> None:
        """One Adam step on ``V`` from the collected ``dL/dW~`` and the regulariser
        (``beta`` None: warm-up); nothing if the step did not call the layer."""
        grad = self._weight.grad
        self._weight = None
        if grad is not None:
            self._adam.step(self._rounding.grad_v(grad, reg_weight, beta))

    @torch.no_grad()
    def hard_weight(self) -> torch.Tensor:
        """``s * clamp(W_floor + [V >= 0], qmin, qmax)``, exactly on the grid."""
        return self._rounding.hard_weight()
