"""The seed-compatible facade: one import gives the seed's names."""

from __future__ import annotations

import adaround_core
from adaround_core import quantization
from adaround_core.quant.fake_quantize import FakeQuantState, set_fake_quantize
from adaround_core.quant.prepare import prepare_qat_fx
from adaround_core.quant.qconfig import QConfig
from adaround_core.reconstruction.weight_reconstruction import weight_reconstruction

SEED_NAMES = ["FakeQuantState", "QConfig", "mix_calibration", "prepare_qat_fx",
              "set_fake_quantize", "weight_reconstruction"]


def test_facade_exports_the_seeds_names():
    assert sorted(quantization.__all__) == sorted(SEED_NAMES)
    assert quantization.prepare_qat_fx is prepare_qat_fx
    assert quantization.set_fake_quantize is set_fake_quantize
    assert quantization.FakeQuantState is FakeQuantState
    assert quantization.QConfig is QConfig
    assert quantization.weight_reconstruction is weight_reconstruction
    assert quantization.mix_calibration is weight_reconstruction


def test_package_root_reexports_the_facade():
    for name in SEED_NAMES:
        assert getattr(adaround_core, name) is getattr(quantization, name)


def test_fake_quant_states_have_the_seeds_names():
    assert {s.name for s in FakeQuantState} == {"CALIBRATION", "VALIDATION", "FLOAT"}
