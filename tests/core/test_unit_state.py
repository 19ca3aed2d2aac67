"""``UnitState``: a unit's nearest and learned states, put in for a moment or written whole."""

from __future__ import annotations

import pytest
import torch

from adaround_core.quant.fake_quantize import FakeQuantize
from adaround_core.quant.observers import MinMaxObserver
from adaround_core.reconstruction.unit_state import LEARNED, NEAREST, UnitState


def _unit() -> tuple[torch.Tensor, FakeQuantize, UnitState]:
    weight = torch.nn.Parameter(torch.tensor([0.3, -0.7]))
    quantizer = FakeQuantize(MinMaxObserver(), 0, 255)
    quantizer.scale.fill_(0.1)
    state = UnitState()
    state.add(weight, torch.tensor([0.0, -1.0]), torch.tensor([1.0, -0.5]))
    state.add_learned_scale(quantizer, torch.tensor([0.2]))
    return weight, quantizer, state


def test_a_state_is_in_the_model_only_inside_applied():
    weight, quantizer, state = _unit()
    for which, values, scale in ((NEAREST, [0.0, -1.0], 0.1), (LEARNED, [1.0, -0.5], 0.2)):
        with state.applied(which):
            assert weight.tolist() == values and quantizer.scale.item() == pytest.approx(scale)
        assert weight.tolist() == pytest.approx([0.3, -0.7])
        assert quantizer.scale.item() == pytest.approx(0.1)
    assert not quantizer.frozen


@pytest.mark.parametrize(("which", "values", "scale", "frozen"),
                         [(NEAREST, [0.0, -1.0], 0.1, False), (LEARNED, [1.0, -0.5], 0.2, True)])
def test_writing_a_state_puts_it_in_whole_and_freezes_learned_scales(which, values, scale, frozen):
    weight, quantizer, state = _unit()
    state.write(which)
    assert weight.tolist() == values
    assert quantizer.scale.item() == pytest.approx(scale)
    assert bool(quantizer.frozen) is frozen


def test_an_unknown_state_is_an_error_naming_both():
    weight, _, state = _unit()
    with pytest.raises(ValueError, match="'nearest' or 'learned', not 'adaround'"):
        state.write("adaround")
    assert weight.tolist() == pytest.approx([0.3, -0.7])
