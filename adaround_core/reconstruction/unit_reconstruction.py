"""Reconstruct one unit with autograd: a block's layers jointly (BRECQ), or one layer whose
activation quantizer is trained (QDrop, learned scales).

The unit's module is run on its captured calls with every rounded layer's weight
fake-quant substituted by its soft-rounded weight ``W~(V)`` and the unit's activation
fake-quants by :class:`~.unit_activations.UnitActivations`. The loss is the squared error
of the unit's output against the float target, summed over the channel dimension of the
unit's last layer and averaged over the rest (for one layer: exactly the layer path's
loss), plus ``weight`` times the rounding regulariser summed over the unit's layers, on
the layer path's β schedule. Adam (``lr``) steps every ``V``. At the end each ``V`` is
hardened, and the unit's learned state (rounding and learned activation scales) is judged
against its nearest state (nearest rounding, calibrated scales) by the unit's held-out
output error (``guard: layer``) or the model's (``guard: output``); the better is written as
a whole (:mod:`~.unit_state`), as on the layer path.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from adaround_core.calibration.layer_samples import LayerSamples
from adaround_core.quant.fake_quantize import FakeQuantize, substituted
from adaround_core.quant.quant_layers import QuantLayerMixin
from adaround_core.reconstruction.adaround_math import beta_at, reconstruction_loss
from adaround_core.reconstruction.layer_reconstruction import (
    LayerReport,
    model_errors,
    nearest_weight,
)
from adaround_core.reconstruction.output_guard import ADAROUND, OutputGuard, decide
from adaround_core.reconstruction.reconstruction_config import AdaRoundConfig
from adaround_core.reconstruction.step_flops import GEMMS_PER_STEP, forward_flops
from adaround_core.reconstruction.threads import intra_op_threads, layer_threads
from adaround_core.reconstruction.unit_activations import UnitActivations
from adaround_core.reconstruction.unit_rounding import LayerRounding
from adaround_core.reconstruction.unit_state import LEARNED, NEAREST, UnitState
from adaround_core.reconstruction.units import Unit
from adaround_core.torch_private import tree_leaves

logger = logging.getLogger(__name__)


def _call(module: nn.Module, inputs: tuple[tuple, dict]) -> Any:
    args, kwargs = inputs
    return module(*args, **kwargs)


def unit_loss(output: Any, target: Any, channel_dim: int) -> torch.Tensor:
    """Reconstruction loss summed over the output's tensors."""
    pairs = zip(tree_leaves(output), tree_leaves(target), strict=True)
    return sum(reconstruction_loss(o, t, channel_dim if o.dim() > 1 else 0) for o, t in pairs)


@torch.no_grad()
def holdout_unit_mse(module: nn.Module, samples: LayerSamples) -> float:
    """Mean squared error of the unit's outputs on the held-out samples, as it computes now."""
    total, count = 0.0, 0
    for inputs, target in samples.holdout():
        for o, t in zip(tree_leaves(_call(module, inputs)), tree_leaves(target), strict=True):
            total += (o - t).pow(2).sum().item()
            count += t.numel()
    return total / max(count, 1)


@contextlib.contextmanager
def _no_parameter_grads(module: nn.Module) -> Iterator[None]:
    """Only ``V`` and the learned scales need gradients, not the module's own parameters."""
    flags = {p: p.requires_grad for p in module.parameters()}
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


@torch.no_grad()
def unit_step_flops(module: nn.Module, layers: list[QuantLayerMixin], inputs: tuple) -> int:
    """FLOPs of one step of the unit on ``inputs``, counted as the layer path counts them:
    forward and weight gradient of each layer call (not the input gradients a block also
    needs), so a unit of one layer gets the layer path's thread choice."""
    total = 0

    def count(layer: nn.Module, args: tuple) -> None:
        nonlocal total
        total += GEMMS_PER_STEP * forward_flops(layer, args[0].shape)

    handles = [layer.register_forward_pre_hook(count) for layer in dict.fromkeys(layers)]
    try:
        _call(module, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return total


def optimise_unit(module: nn.Module, roundings: dict[FakeQuantize, LayerRounding],
                  activations: UnitActivations, samples: LayerSamples, channel_dim: int,
                  cfg: AdaRoundConfig, generator: torch.Generator,
                  on_step: Callable[[int], None] | None = None) -> None:
    """``cfg.num_steps`` Adam steps on every ``V`` (and the learned activation scales)."""
    batch_size = cfg.batch_size or samples.default_batch_size
    soft = {fq: r.soft_weight for fq, r in roundings.items()}
    with substituted(soft), activations.active(training=True):
        for step in range(cfg.num_steps):
            beta = beta_at(step, cfg.num_steps, cfg.warm_up, cfg.b_range)
            inputs, target = samples.sample(batch_size, generator)
            for rounding in roundings.values():
                rounding.start_step()
            with torch.enable_grad():
                unit_loss(_call(module, inputs), target, channel_dim).backward()
            for rounding in roundings.values():
                rounding.step(cfg.weight, beta)
            activations.step()
            if on_step is not None:
                on_step(step)


def reconstruct_unit(unit: Unit, module: nn.Module, layers: dict[str, QuantLayerMixin],
                     samples: LayerSamples, cfg: AdaRoundConfig, generator: torch.Generator,
                     on_step: Callable[[int], None] | None = None,
                     output_guard: OutputGuard | None = None) -> LayerReport:
    """Reconstruct ``unit`` (its layers' weight scales frozen) in place; report the outcome
    under the unit's name. With ``guard: output``, ``output_guard`` judges the unit's
    learned state against its nearest one on the model's output."""
    start = time.perf_counter()
    unit_layers = [layers[name] for name in unit.layers]
    device = unit_layers[0].weight.device
    quantizers = [layer.input_fake_quant for layer in unit_layers
                  if isinstance(layer.input_fake_quant, FakeQuantize)]
    activations = UnitActivations(quantizers, cfg, unit.name, device)
    roundings = {layer.weight_fake_quant: LayerRounding(layer, cfg.lr) for layer in unit_layers}
    probe = samples.sample(cfg.batch_size or samples.default_batch_size,
                           torch.Generator().manual_seed(0))[0]
    flops = unit_step_flops(module, unit_layers, probe)
    threads = layer_threads(cfg.num_threads, device, flops)
    with intra_op_threads(threads), _no_parameter_grads(module):
        nearest_err = holdout_unit_mse(module, samples)
        optimise_unit(module, roundings, activations, samples,
                      unit_layers[-1].output_channel_dim, cfg, generator, on_step)
        hard = {fq: r.hard_weight() for fq, r in roundings.items()}
        with substituted({fq: (lambda w, h=h: h) for fq, h in hard.items()}), \
                activations.active(training=False):
            adaround_err = holdout_unit_mse(module, samples)
    state = _unit_state(unit_layers, hard, activations)
    output_errs = output_guard.compare(state) if output_guard else None
    decision = decide(cfg.guard, (nearest_err, adaround_err), output_errs)
    state.write(LEARNED if decision == ADAROUND else NEAREST)
    report = LayerReport(unit.name, nearest_err, adaround_err, decision, cfg.num_steps,
                         time.perf_counter() - start, threads, flops, *(output_errs or (None, None)),
                         layers=unit.layers if unit.is_block else ())
    logger.info("%s (%d layers): output MSE nearest %.4g, adaround %.4g%s -> %s (%.2fs)",
                unit.name, len(unit.layers), nearest_err, adaround_err,
                model_errors(output_errs), report.decision, report.seconds)
    return report


def _unit_state(unit_layers: list[QuantLayerMixin], hard: dict[FakeQuantize, torch.Tensor],
                activations: UnitActivations) -> UnitState:
    """The unit's nearest and learned states: its layers' weights, its learned scales."""
    state = UnitState()
    for layer in unit_layers:
        state.add(layer.weight, nearest_weight(layer), hard[layer.weight_fake_quant])
    for quantizer, scale in activations.scales.items():
        state.add_learned_scale(quantizer, scale)
    return state
