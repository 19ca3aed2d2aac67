"""The per-layer optimisation loop as it was before the speed work (autograd through
:mod:`adaround_core.reconstruction.adaround_math`, ``torch.optim.Adam``), kept verbatim so that
``bench/bench_speed.py`` can time old and new in the same run. Not used by the product.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from adaround_core.calibration.layer_samples import LayerSamples
from adaround_core.quant.quant_layers import QuantLayerMixin
from adaround_core.reconstruction.adaround_math import (
    beta_at,
    hard_quantized_weight,
    init_rounding_variable,
    reconstruction_loss,
    rectified_sigmoid,
    rounding_regularizer,
    soft_quantized_weight,
    split_on_grid,
)
from adaround_core.reconstruction.reconstruction_config import AdaRoundConfig


def optimise_rounding_autograd(layer: QuantLayerMixin, samples: LayerSamples,
                               cfg: AdaRoundConfig, generator: torch.Generator,
                               on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Run ``cfg.num_steps`` Adam steps on the rounding variable ``V``; return the hard weight."""
    scale, qmin, qmax = layer.weight_qparams()
    w_floor, rest = split_on_grid(layer.weight.detach(), scale)
    v = init_rounding_variable(rest).requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=cfg.lr)
    batch_size = cfg.batch_size or samples.default_batch_size
    for step in range(cfg.num_steps):
        x, target = samples.sample(batch_size, generator)
        h = rectified_sigmoid(v)
        output = layer.forward_with_weight(x, soft_quantized_weight(w_floor, h, scale, qmin, qmax))
        loss = reconstruction_loss(output, target, layer.output_channel_dim)
        beta = beta_at(step, cfg.num_steps, cfg.warm_up, cfg.b_range)
        if beta is not None:
            loss = loss + cfg.weight * rounding_regularizer(h, beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step)
    return hard_quantized_weight(w_floor, v.detach(), scale, qmin, qmax)
