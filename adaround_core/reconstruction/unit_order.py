"""Round units one after another: capture each unit's data, reconstruct it, write it.

:func:`round_layer_unit` is the one place that picks the path of a single layer: the
hand-written fast path (:func:`~.layer_reconstruction.reconstruct_layer`) for plain
AdaRound, the autograd unit path when its activation quantizer is trained.
:func:`reconstruct_units` runs ``granularity: block``: the units are captured by continuing
one forward pass of each model where the graph allows it, else each with its own passes
(:mod:`~adaround_core.calibration.capture_method`), a block reconstructed by
:func:`~.unit_reconstruction.reconstruct_unit`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import closing
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from adaround_core.calibration.batches import CalibrationBatches
from adaround_core.calibration.capture_method import LayerCapturer, layer_capturer
from adaround_core.calibration.layer_capture import first_call_order
from adaround_core.calibration.layer_samples import LayerSamples
from adaround_core.calibration.unit_samples import unit_samples
from adaround_core.quant.fake_quantize import FakeQuantize, FakeQuantState
from adaround_core.quant.model_modes import eval_mode, fake_quant_state, float_reference
from adaround_core.quant.quant_layers import QuantLayerMixin
from adaround_core.reconstruction.distributed import RankGroup
from adaround_core.reconstruction.layer_reconstruction import (
    LayerReport,
    layer_generator,
    reconstruct_layer,
)
from adaround_core.reconstruction.output_guard import OutputGuard, guarded_batches
from adaround_core.reconstruction.reconstruction_config import AdaRoundConfig
from adaround_core.reconstruction.report import ReconstructionReport
from adaround_core.reconstruction.unit_reconstruction import reconstruct_unit
from adaround_core.reconstruction.units import Unit


def round_layer_unit(name: str, layers: dict[str, QuantLayerMixin], inputs: list[torch.Tensor],
                     targets: list[torch.Tensor], cfg: AdaRoundConfig,
                     on_step: Callable[[int], None] | None = None,
                     output_guard: OutputGuard | None = None,
                     ranks: RankGroup | None = None) -> LayerReport:
    """Round one layer from its captured inputs: fake-quantized ones for the fast path
    (which alone takes ``ranks``); with ``cfg.trains_activations``, the inputs before its
    activation fake-quant."""
    generator = layer_generator(cfg.seed, name)
    if cfg.trains_activations:
        calls = [((x,), {}, y) for x, y in zip(inputs, targets, strict=True)]
        samples = unit_samples(name, calls, cfg.holdout_fraction, generator)
        del inputs, targets, calls
        return reconstruct_layer_unit(name, layers, samples, cfg, generator, on_step,
                                      output_guard)
    samples = LayerSamples.from_tensors(inputs, targets, cfg.holdout_fraction, generator)
    del inputs, targets
    return reconstruct_layer(name, layers[name], samples, cfg, generator, on_step,
                             output_guard=output_guard, ranks=ranks)


def reconstruct_layer_unit(name: str, layers: dict[str, QuantLayerMixin], samples: LayerSamples,
                           cfg: AdaRoundConfig, generator: torch.Generator,
                           on_step: Callable[[int], None] | None = None,
                           output_guard: OutputGuard | None = None) -> LayerReport:
    """One layer through the autograd unit path (its activation quantizer trained), from
    samples of its calls ``((x,), {})`` with ``x`` its input before ``input_fake_quant``."""
    return reconstruct_unit(Unit(name, (name,)), layers[name], layers, samples, cfg,
                            generator, on_step, output_guard)


def block_calls(model: nn.Module, units: list[Unit], batch: Any) -> dict[str, int]:
    """How often a float forward pass on ``batch`` calls each block unit's module; an
    error naming a block its forward never calls as a module."""
    blocks = {u.name: model.get_submodule(u.name) for u in units if u.is_block}
    if not blocks:
        return {}
    with eval_mode(model), fake_quant_state(model, FakeQuantState.FLOAT):
        _, calls = first_call_order(model, blocks, batch)
    for name in blocks:
        if not calls[name]:
            raise ValueError(f"block {name!r} is never called as a module (its parent calls "
                             f"its layers directly); name other modules in "
                             f"custom_config_dict['blocks'] or use granularity: layer")
    return {name: calls[name] for name in blocks}


def reconstruct_units(model: nn.Module, layers: dict[str, QuantLayerMixin], units: list[Unit],
                      calls: dict[str, int], data: CalibrationBatches,
                      cfg: AdaRoundConfig, one_pass: bool = True) -> ReconstructionReport:
    """Reconstruct ``units`` in order (model in rounding mode); the report, a row per unit.
    ``one_pass``: capture by continuing one forward pass where the model allows it. With
    ``guard: output`` the held-out batches are left out of every unit's capture and judge
    each unit on the model's output."""
    float_model = float_reference(model)
    training, guard = guarded_batches(model, float_model, data, cfg)
    capturer = layer_capturer(model, float_model, [u.name for u in units], training,
                              data.first(), (QuantLayerMixin, FakeQuantize), one_pass,
                              blocks=[u.name for u in units if u.is_block])
    report = ReconstructionReport(capture_method=capturer.method, capture_note=capturer.note)
    with closing(capturer), tqdm(total=len(units) * cfg.num_steps, unit="step",
                                 desc="AdaRound", disable=not cfg.progress) as bar:
        for unit in units:
            bar.set_postfix_str(unit.name)
            for name in unit.layers:
                layers[name].freeze_weight_qparams()
            report.layers.append(_round_unit(model, capturer, layers, unit, calls, cfg,
                                             lambda _: bar.update(), guard))
    return report


def _round_unit(model: nn.Module, capturer: LayerCapturer, layers: dict[str, QuantLayerMixin],
                unit: Unit, calls: dict[str, int], cfg: AdaRoundConfig,
                on_step: Callable[[int], None], guard: OutputGuard | None) -> LayerReport:
    if not unit.is_block:
        inputs, targets = capturer.capture_layer_io(unit.name, calls[unit.name],
                                                    quantize_input=not cfg.trains_activations)
        return round_layer_unit(unit.name, layers, inputs, targets, cfg, on_step, guard)
    generator = layer_generator(cfg.seed, unit.name)
    captured = list(capturer.iter_unit_calls(unit.name, calls[unit.name]))
    samples = unit_samples(unit.name, captured, cfg.holdout_fraction, generator)
    del captured
    return reconstruct_unit(unit, model.get_submodule(unit.name), layers, samples, cfg,
                            generator, on_step, guard)
