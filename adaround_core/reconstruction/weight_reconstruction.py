"""``weight_reconstruction``: AdaRound every Conv/Linear of a calibrated model, in place.

The toolchain API specified in ``docs/weight_reconstruction.md``: layers are rounded one at a time in the order the forward pass first calls them,
each against the float model's output of that layer on its quantized-model input.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from torch import nn
from tqdm.auto import tqdm

from adaround_core.calibration.batches import CalibrationBatches, model_device
from adaround_core.calibration.capture_method import LayerCapturer, layer_capturer
from adaround_core.calibration.layer_capture import first_call_order
from adaround_core.quant.fake_quantize import FakeQuantize, FakeQuantState
from adaround_core.quant.model_modes import eval_mode, fake_quant_state, float_reference
from adaround_core.quant.quant_layers import QuantLayerMixin, quant_layers
from adaround_core.reconstruction.distributed import RankGroup, check_same_settings, join
from adaround_core.reconstruction.output_guard import OutputGuard, guarded_batches
from adaround_core.reconstruction.reconstruction_config import AdaRoundConfig
from adaround_core.reconstruction.report import ReconstructionReport
from adaround_core.reconstruction.rounding_mode import rounding_mode
from adaround_core.reconstruction.step_flops import LargestCall
from adaround_core.reconstruction.threads import capture_threads
from adaround_core.reconstruction.unit_order import (
    block_calls,
    reconstruct_units,
    round_layer_unit,
)
from adaround_core.reconstruction.units import plan_units

logger = logging.getLogger(__name__)

# Capture each layer's (or unit's) inputs by continuing one forward pass (True), or by
# partial passes per layer (False; the fallback, switchable for equality tests and benchmarks).
ONE_PASS_CAPTURE = True


def weight_reconstruction(calib_model: nn.Module, batches: Iterable[Any],
                          batch_process_func: Callable[[Any], Any] | None = None,
                          custom_config_dict: dict[str, Any] | None = None,
                          ) -> ReconstructionReport:
    """Learn the rounding of every quantized Conv/Linear of ``calib_model`` (AdaRound).

    ``calib_model`` comes from ``prepare_qat_fx`` and has been calibrated; it may be in
    the CALIBRATION state (as in the seed) or VALIDATION. Weights are rewritten in
    place onto their frozen quantization grid; the model's fake-quant states and
    calibration statistics are left as they were. ``batches`` is a list/tuple (moved
    to the model's device once) or a DataLoader (streamed, ``num_batches`` of it).
    Returns the per-layer report.

    Under ``torchrun`` (several ranks, each with the same model and batches) the ranks
    split every optimisation batch and sum their gradients (:mod:`~.distributed`); they
    must all get the same ``custom_config_dict`` and end with the same weights.
    """
    cfg = AdaRoundConfig.from_dict(custom_config_dict)
    layers = _prepared_layers(calib_model)
    ranks = join(model_device(calib_model))
    if ranks is not None:
        check_same_settings(ranks, cfg.model_dump(mode="json", exclude={"progress"}),
                            "custom_config_dict")
        cfg = cfg.model_copy(update={"progress": cfg.progress and ranks.rank == 0})
        for key, value in cfg.single_process_settings.items():
            raise ValueError(f"custom_config_dict: {key}={value!r} does not run under "
                             f"torchrun (only layer-wise AdaRound without drop_prob / "
                             f"activation_lr runs data-parallel); run it in one process")
    data = CalibrationBatches(batches, batch_process_func, model_device(calib_model),
                              cfg.num_batches)
    data.check_all()
    check_any_calibrated(layers)  # before any forward pass (one may fold BatchNorms)
    selected, calls, largest_call = rounding_order(calib_model, data.first(),
                                                   cfg.exclude_prefix)
    units = plan_units(calib_model, selected, cfg)
    calls |= block_calls(calib_model, units, data.first())
    threads = capture_threads(cfg.num_threads, model_device(calib_model), largest_call)
    with rounding_mode(calib_model, threads) as num_threads:
        if cfg.granularity == "block":
            report = reconstruct_units(calib_model, layers, units, calls, data, cfg,
                                       ONE_PASS_CAPTURE)
        else:
            report = _reconstruct_layers(calib_model, layers, selected, calls, data, cfg, ranks)
    report.num_threads = num_threads
    return report


mix_calibration = weight_reconstruction  # the seed's name for the DataLoader call


class RoundingOrder(NamedTuple):
    """What :func:`rounding_order` reads off one forward pass."""

    names: list[str]  # the layers to round, in first-call order
    calls: dict[str, int]  # how often each is called per forward
    largest_call_flops: int  # FLOPs of the largest layer call: sizes capture's threads


def rounding_order(model: nn.Module, batch: Any, exclude_prefix: list[str]) -> RoundingOrder:
    """The layers to round, in the order a float forward pass on ``batch`` first calls
    them, minus ``exclude_prefix``, and how often each is called per forward; checks they
    are calibrated. Changes nothing but a pending BatchNorm fold."""
    layers = quant_layers(model)
    with eval_mode(model), fake_quant_state(model, FakeQuantState.FLOAT), \
            LargestCall(layers.values()) as largest:
        order, calls = first_call_order(model, layers, batch)
    selected = select_layers(order, exclude_prefix)
    check_calibrated(layers, selected)
    return RoundingOrder(selected, {name: calls[name] for name in selected}, largest.flops)


def _reconstruct_layers(model: nn.Module, layers: dict[str, QuantLayerMixin], selected: list[str],
                        calls: dict[str, int], data: CalibrationBatches,
                        cfg: AdaRoundConfig, ranks: RankGroup | None) -> ReconstructionReport:
    float_model = float_reference(model)
    training, guard = guarded_batches(model, float_model, data, cfg)
    capturer = layer_capturer(model, float_model, selected, training, data.first(),
                              (QuantLayerMixin, FakeQuantize), ONE_PASS_CAPTURE)
    report = ReconstructionReport(capture_method=capturer.method, capture_note=capturer.note)
    try:
        _round_in_order(layers, selected, calls, capturer, cfg, report, guard, ranks)
    finally:
        capturer.close()
    return report


def _round_in_order(layers: dict[str, QuantLayerMixin], selected: list[str],
                    calls: dict[str, int], capturer: LayerCapturer, cfg: AdaRoundConfig,
                    report: ReconstructionReport, guard: OutputGuard | None,
                    ranks: RankGroup | None) -> None:
    with tqdm(total=len(selected) * cfg.num_steps, unit="step", desc="AdaRound",
              disable=not cfg.progress) as bar:
        for name in selected:
            bar.set_postfix_str(name)
            layers[name].freeze_weight_qparams()
            inputs, targets = capturer.capture_layer_io(name, calls[name],
                                                        quantize_input=not cfg.trains_activations)
            report.layers.append(round_layer_unit(name, layers, inputs, targets, cfg,
                                                  on_step=lambda _: bar.update(),
                                                  output_guard=guard, ranks=ranks))


def _prepared_layers(model: nn.Module) -> dict[str, QuantLayerMixin]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"calib_model must be a torch.nn.Module, got {type(model).__name__}")
    layers = quant_layers(model)
    if not layers:
        raise ValueError("calib_model was never prepared: call prepare_qat_fx(model), "
                         "calibrate it, then call weight_reconstruction")
    return layers


def select_layers(order: list[str], exclude_prefix: list[str]) -> list[str]:
    if not order:
        raise ValueError("the forward pass on the first batch called no quantized layer")
    selected = [n for n in order if not any(n.startswith(p) for p in exclude_prefix)]
    if not selected:
        raise ValueError(f"no Conv/Linear layer left after exclude_prefix={exclude_prefix!r} "
                         f"(layers: {order})")
    skipped = len(order) - len(selected)
    logger.info("AdaRound on %d layers (%d excluded by prefix)", len(selected), skipped)
    return selected


def check_any_calibrated(layers: dict[str, QuantLayerMixin]) -> None:
    quantizers = [m.input_fake_quant for m in layers.values()
                  if isinstance(m.input_fake_quant, FakeQuantize)]
    if quantizers and not any(fq.has_qparams for fq in quantizers):
        raise ValueError("calib_model was never calibrated (no activation statistics): set "
                         "FakeQuantState.CALIBRATION and run forward passes first")


def check_calibrated(layers: dict[str, QuantLayerMixin], selected: list[str]) -> None:
    missing = [n for n in selected if isinstance(layers[n].input_fake_quant, FakeQuantize)
               and not layers[n].input_fake_quant.has_qparams]
    if missing:
        raise ValueError(f"calib_model was never calibrated (no activation statistics for "
                         f"{missing[:3]}...): set FakeQuantState.CALIBRATION and run forward "
                         f"passes first")
