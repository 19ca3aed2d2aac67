"""The per-step math of AdaRound on one layer, with the gradient of ``V`` written out.

:mod:`~adaround_core.reconstruction.adaround_math` states the equations as pure functions; autograd
through them records about 30 small elementwise ops per step, each with its own
dispatch, allocation and graph node. Here the same loss is differentiated by hand
(chain rule of the loss in ``docs/weight_reconstruction.md``, checked against autograd in the tests) into reused
buffers, so one step is: soft weight (7 ops), the layer's own forward and
weight-gradient kernels (``QuantLayerMixin.weight_vjp``, no autograd graph for
Conv/Linear), then ``dL/dV`` (6 ops, plus 9 while the regulariser is on) and one
fused Adam update.

With ``u = W_floor + h(V)``, ``r = sigmoid(V) * (ZETA - GAMMA) + GAMMA`` and
``h = clamp(r, 0, 1)``:

    dL/dV = ( s * dL/dW~ * [qmin <= u <= qmax]  +  lambda * dR/dh )
            * [0 <= r <= 1] * (ZETA - GAMMA) * sigmoid(V) * (1 - sigmoid(V))
    dR/dh = -2 * beta * |2h - 1| ^ (beta - 1) * sign(2h - 1)

The indicator brackets are autograd's clamp gradient (bounds included), taken as
``clamp(x) == x``.
"""

from __future__ import annotations

import torch

from adaround_core.reconstruction.adaround_math import (
    ADAROUND_GAMMA,
    ADAROUND_ZETA,
    init_rounding_variable,
    split_on_grid,
)
from adaround_core.torch_private import fused_adam_available, fused_adam_step, sigmoid_backward

_STRETCH = ADAROUND_ZETA - ADAROUND_GAMMA


class SoftRounding:
    """``V`` of one layer and everything one optimisation step needs, in reused buffers."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> None:
        w_floor, rest = split_on_grid(weight.detach(), scale)
        self.w_floor, self.scale, self.qmin, self.qmax = w_floor, scale, qmin, qmax
        self.v = init_rounding_variable(rest)
        self._scale_stretch = scale * _STRETCH
        empty = [torch.empty_like(self.v) for _ in range(5)]
        self._sigmoid, self._raw, self._h, self._u, self._u_clamped = empty
        self._mask = torch.empty_like(self.v)
        self._reg = torch.empty_like(self.v)
        self.soft_weight = torch.empty_like(self.v)

    @torch.no_grad()
    def update_soft_weight(self) -> torch.Tensor:
        """Write ``W~ = s * clamp(W_floor + h(V), qmin, qmax)`` into :attr:`soft_weight`."""
        torch.sigmoid(self.v, out=self._sigmoid)
        torch.mul(self._sigmoid, _STRETCH, out=self._raw).add_(ADAROUND_GAMMA)
        torch.clamp(self._raw, 0.0, 1.0, out=self._h)
        torch.add(self.w_floor, self._h, out=self._u)
        torch.clamp(self._u, self.qmin, self.qmax, out=self._u_clamped)
        torch.mul(self._u_clamped, self.scale, out=self.soft_weight)
        return self.soft_weight

    @torch.no_grad()
    def grad_v(self, grad_weight: torch.Tensor, reg_weight: float,
               beta: float | None) -> torch.Tensor:
        """``dL/dV`` from ``dL/dW~`` (overwritten) and the regulariser term (``beta`` None:
        warm-up, no regulariser). Call after :meth:`update_soft_weight` of the same step."""
        grad = grad_weight.mul_(self._scale_stretch)
        grad.mul_(torch.eq(self._u_clamped, self._u, out=self._mask))
        if beta is not None and reg_weight != 0.0:
            grad.add_(self._regulariser_grad(beta), alpha=-2.0 * beta * reg_weight * _STRETCH)
        grad.mul_(torch.eq(self._h, self._raw, out=self._mask))
        return sigmoid_backward(grad, self._sigmoid)

    def _regulariser_grad(self, beta: float) -> torch.Tensor:
        """``|2h - 1| ^ (beta - 1) * sign(2h - 1)``, eq. (24) differentiated."""
        centred = torch.mul(self._h, 2.0, out=self._reg).sub_(1.0)
        magnitude = torch.abs(centred, out=self._mask)
        if beta == 1.0:
            magnitude.fill_(1.0)  # pow(x, 0) == 1, also at x == 0
        else:
            # |x| ^ (beta - 1) as exp2((beta - 1) * log2|x|): half the cost of pow on CPU
            magnitude.log2_().mul_(beta - 1.0).exp2_()
        return magnitude.mul_(torch.sign(centred, out=self._reg))

    @torch.no_grad()
    def hard_weight(self) -> torch.Tensor:
        """The final weight ``s * clamp(W_floor + [V >= 0], qmin, qmax)``, exactly on the grid."""
        up = (self.v >= 0).to(self.w_floor.dtype)
        return torch.clamp(self.w_floor + up, self.qmin, self.qmax) * self.scale


class FusedAdam:
    """Adam on one tensor (``torch.optim.Adam`` defaults: betas (0.9, 0.999), eps 1e-8, no
    weight decay), stepped with the kernel behind ``torch.optim.Adam(fused=True)`` but
    without the optimizer's per-step Python bookkeeping (tens of microseconds a step,
    which on small layers is as much as the layer's own math)."""

    BETAS = (0.9, 0.999)
    EPS = 1e-8

    def __init__(self, param: torch.Tensor, lr: float) -> None:
        self.param, self.lr = param, lr
        self._exp_avg = torch.zeros_like(param)
        self._exp_avg_sq = torch.zeros_like(param)
        self._step = torch.zeros((), dtype=torch.float32, device=param.device)
        self._fallback = None if fused_adam_available(param) else \
            torch.optim.Adam([param], lr=lr, betas=self.BETAS, eps=self.EPS)

    def step(self, grad: torch.Tensor) -> None:
        """One Adam update of the parameter with gradient ``grad``."""
        if self._fallback is not None:
            self.param.grad = grad
            self._fallback.step()
            return
        self._step.add_(1)
        fused_adam_step(self.param, grad, self._exp_avg, self._exp_avg_sq, self._step, self.lr,
                        self.BETAS, self.EPS)


@torch.no_grad()
def step_all(adams: list[tuple[torch.Tensor, FusedAdam]]) -> None:
    """One Adam step of each leaf tensor by its gradient, which is then cleared."""
    for leaf, adam in adams:
        adam.step(leaf.grad)
        leaf.grad = None
