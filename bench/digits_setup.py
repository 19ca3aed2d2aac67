"""Shared setup of the speed benchmarks: the demo DigitsCNN, calibrated, and each layer's
cached samples exactly as ``weight_reconstruction`` builds them.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from adaround_core import quantization as q
from adaround_core.calibration.layer_capture import capture_layer_io, first_call_order
from adaround_core.calibration.layer_samples import LayerSamples
from adaround_core.demo.digits import DigitsSplits, load_digits_splits
from adaround_core.demo.models import DigitsCNN
from adaround_core.demo.training import train_classifier
from adaround_core.quant.fake_quantize import FakeQuantState
from adaround_core.quant.model_modes import eval_mode, fake_quant_state, float_reference
from adaround_core.quant.quant_layers import QuantLayerMixin, quant_layers
from adaround_core.reconstruction.layer_reconstruction import layer_generator

CALIB_BATCH = 32


@dataclass
class LayerCase:
    """One layer of the calibrated model with the inputs/targets AdaRound would see."""

    name: str
    layer: QuantLayerMixin
    inputs: list[torch.Tensor]
    targets: list[torch.Tensor]

    def samples(self, seed: int = 0, holdout_fraction: float = 0.1) -> tuple[LayerSamples,
                                                                              torch.Generator]:
        generator = layer_generator(seed, self.name)
        return LayerSamples.from_tensors(self.inputs, self.targets, holdout_fraction,
                                         generator), generator


def float_model(seed: int = 0) -> tuple[torch.nn.Module, DigitsSplits]:
    """The trained float DigitsCNN (seeded) and the data splits."""
    data = load_digits_splits(seed=seed)
    torch.manual_seed(seed)
    return train_classifier(DigitsCNN(), data.train_x, data.train_y, seed=seed), data


def calibrated(model: torch.nn.Module, batches: list[torch.Tensor], bits: int,
               observer: str = "minmax") -> torch.nn.Module:
    """A W``bits``A8 fake-quant copy of ``model`` calibrated on ``batches`` (CALIBRATION)."""
    cm = q.prepare_qat_fx(model, q.QConfig(weight_bits=bits, activation_bits=8,
                                           weight_observer=observer))
    q.set_fake_quantize(cm, q.FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for batch in batches:
            cm(batch)
    return cm


def layer_cases(cm: torch.nn.Module, batches: list[torch.Tensor]) -> list[LayerCase]:
    """Every layer in rounding order with its captured samples; the weight scales are
    frozen, the weights left unrounded (each layer is timed on its own)."""
    layers = quant_layers(cm)
    cases = []
    with eval_mode(cm):
        with fake_quant_state(cm, FakeQuantState.FLOAT):
            order, calls = first_call_order(cm, layers, batches[0])
        reference = float_reference(cm)
        with fake_quant_state(cm, FakeQuantState.VALIDATION):
            for name in order:
                layers[name].freeze_weight_qparams()
                inputs, targets = capture_layer_io(cm, reference, name, calls[name], batches)
                cases.append(LayerCase(name, layers[name], inputs, targets))
    return cases


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "loadavg": os.getloadavg()}
