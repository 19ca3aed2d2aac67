"""One quantized layer on synthetic data, ready for the engine's per-layer routine.

The timing benchmarks need a layer of a given shape with samples of a given shape,
not a trained model: a step's time does not depend on the values. The layer is
prepared and calibrated like any other (W4A8 by default), its weight scale frozen.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from adaround_core import quantization as q
from adaround_core.calibration.layer_samples import LayerSamples
from adaround_core.quant.quant_layers import QuantLayerMixin, quant_layers
from adaround_core.reconstruction.distributed import RankGroup
from adaround_core.reconstruction.layer_reconstruction import layer_generator, optimise_rounding
from adaround_core.reconstruction.reconstruction_config import AdaRoundConfig

HOLDOUT_FRACTION = 0.1


class LayerCase:
    """A calibrated quantized copy of ``module`` and ``rows`` samples of ``row_shape``."""

    def __init__(self, name: str, module: nn.Module, row_shape: Sequence[int], rows: int,
                 bits: int = 4, seed: int = 0) -> None:
        torch.manual_seed(seed)
        x = torch.rand(rows, *row_shape)  # non-negative, like a post-ReLU activation
        cm = q.prepare_qat_fx(nn.Sequential(module), q.QConfig(weight_bits=bits))
        cm.eval()
        q.set_fake_quantize(cm, q.FakeQuantState.CALIBRATION)
        with torch.no_grad():
            cm(x)
        q.set_fake_quantize(cm, q.FakeQuantState.VALIDATION)
        self.name, self.row_shape = name, tuple(row_shape)
        self.layer: QuantLayerMixin = quant_layers(cm)["0"]
        self.layer.freeze_weight_qparams()
        with torch.no_grad():
            self.inputs = self.layer.input_fake_quant(x)
            self.targets = module(x)

    def samples(self, seed: int = 0) -> tuple[LayerSamples, torch.Generator]:
        generator = layer_generator(seed, self.name)
        return LayerSamples.from_tensors([self.inputs], [self.targets], HOLDOUT_FRACTION,
                                         generator), generator


def step_seconds(case: LayerCase, cfg: AdaRoundConfig,
                 ranks: RankGroup | None = None) -> list[float]:
    """Seconds of each step after the first of one ``optimise_rounding`` run (the first
    pays for allocations and kernel selection); the caller sets the threads. ``ranks``:
    this process's share of a data-parallel run."""
    samples, generator = case.samples()
    stamps = [time.perf_counter()]
    optimise_rounding(case.layer, samples, cfg, generator,
                      on_step=lambda _: stamps.append(time.perf_counter()), ranks=ranks)
    return [b - a for a, b in zip(stamps[1:-1], stamps[2:], strict=True)]
