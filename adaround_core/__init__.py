"""adaround_core: fake quantization, calibration and AdaRound weight reconstruction."""

from adaround_core.quantization import (
    FakeQuantState,
    QConfig,
    mix_calibration,
    prepare_qat_fx,
    set_fake_quantize,
    weight_reconstruction,
)

__all__ = [
    "FakeQuantState",
    "QConfig",
    "mix_calibration",
    "prepare_qat_fx",
    "set_fake_quantize",
    "weight_reconstruction",
]
