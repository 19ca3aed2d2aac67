"""The seed-compatible facade: port the seed's snippets by changing one import.

    from adaround_core import quantization as horizon_quantization
"""

from adaround_core.quant.fake_quantize import FakeQuantState, set_fake_quantize
from adaround_core.quant.prepare import prepare_qat_fx
from adaround_core.quant.qconfig import QConfig
from adaround_core.reconstruction.weight_reconstruction import (
    mix_calibration,
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
