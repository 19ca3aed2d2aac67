"""AdaRound's equations as pure functions (Nagel et al., ICML 2020, "Up or Down?").

Notation follows ``docs/weight_reconstruction.md``: ``s`` is the per-channel weight scale, ``V`` the
learned rounding variable, ``h(V)`` the rectified sigmoid that decides the rounding.
"""

from __future__ import annotations

import math

import torch

ADAROUND_ZETA = 1.1  # stretch of the rectified sigmoid, eq. (23)
ADAROUND_GAMMA = -0.1  # shift of the rectified sigmoid, eq. (23)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``, eq. (23)."""
    return torch.clamp(torch.sigmoid(v) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0, 1)


def init_rounding_variable(rest: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = rest`` (the fractional part of ``W / s``): AdaRound starts
    from the float weight itself."""
    p = (rest - ADAROUND_GAMMA) / (ADAROUND_ZETA - ADAROUND_GAMMA)
    return torch.log(p / (1 - p))


def split_on_grid(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(floor(W / s), W / s - floor(W / s))``."""
    scaled = weight * (1.0 / scale)
    w_floor = torch.floor(scaled)
    return w_floor, scaled - w_floor


def soft_quantized_weight(w_floor: torch.Tensor, h: torch.Tensor, scale: torch.Tensor,
                          qmin: int, qmax: int) -> torch.Tensor:
    """``W~ = s * clamp(floor(W / s) + h(V), qmin, qmax)``, eq. (22)."""
    return torch.clamp(w_floor + h, qmin, qmax) * scale


def hard_quantized_weight(w_floor: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                          qmin: int, qmax: int) -> torch.Tensor:
    """Final weight ``s * clamp(floor(W / s) + [V >= 0], qmin, qmax)``: exactly on the grid."""
    return torch.clamp(w_floor + (v >= 0).to(w_floor.dtype), qmin, qmax) * scale


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """``sum(1 - |2 h(V) - 1| ^ beta)``, eq. (24): pushes every ``h(V)`` to 0 or 1."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor,
                        channel_dim: int) -> torch.Tensor:
    """Squared error summed over output channels, averaged over everything else."""
    return (output - target).pow(2).sum(dim=channel_dim).mean()


def warm_up_steps(num_steps: int, warm_up: float) -> int:
    """Number of leading steps without the regulariser: steps ``t < warm_up * num_steps``.

    The product is rounded first so float noise (``0.07 * 100 == 7.000000000000001``)
    does not add a step."""
    return min(num_steps, math.ceil(round(warm_up * num_steps, 9)))


def beta_at(step: int, num_steps: int, warm_up: float,
            b_range: tuple[float, float]) -> float | None:
    """β of the regulariser at ``step`` (0-based), or None during warm-up.

    After warm-up β decays linearly from ``b_range[0]`` at the first regularised
    step to ``b_range[1]`` at the last step.
    """
    start = warm_up_steps(num_steps, warm_up)
    if step < start:
        return None
    active = num_steps - start
    progress = (step - start) / (active - 1) if active > 1 else 1.0
    b_start, b_end = b_range
    return b_start + (b_end - b_start) * progress
