"""``QConfig`` defaults and validation."""

from __future__ import annotations

import pydantic
import pytest

from adaround_core.quant.qconfig import QConfig


def test_defaults():
    q = QConfig()
    assert (q.weight_bits, q.activation_bits) == (4, 8)
    assert (q.weight_observer, q.activation_observer) == ("minmax", "minmax")
    assert q.fold_batchnorm is True


def test_frozen():
    with pytest.raises(pydantic.ValidationError):
        QConfig().weight_bits = 8


@pytest.mark.parametrize("bits", [2, 8])
def test_weight_bits_bounds_accepted(bits):
    assert QConfig(weight_bits=bits).weight_bits == bits


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragment"),
    [
        ({"weight_bits": 1}, ValueError, "weight_bits"),
        ({"weight_bits": 9}, ValueError, "weight_bits"),
        ({"weight_bits": True}, ValueError, "weight_bits"),
        ({"weight_bits": 4.0}, ValueError, "weight_bits"),
        ({"activation_bits": 1}, ValueError, "activation_bits"),
        ({"activation_bits": 17}, ValueError, "activation_bits"),
        ({"weight_observer": "percentile"}, ValueError, "weight_observer"),
        ({"activation_observer": "max"}, ValueError, "activation_observer"),
        ({"percentile": 50.0}, ValueError, "percentile"),
        ({"percentile": 100.5}, ValueError, "percentile"),
    ],
)
def test_invalid_values_name_the_field(kwargs, exc, fragment):
    with pytest.raises(exc, match=rf"^QConfig\['{fragment}'\]: [^\n]*$"):
        QConfig.from_dict(kwargs)
    with pytest.raises(exc, match=fragment):  # direct construction: pydantic's own message
        QConfig(**kwargs)


def test_float_activations_allowed():
    assert QConfig(activation_bits=None).activation_bits is None


def test_observer_choices_match_the_observers():
    from typing import get_args

    from adaround_core.quant.observers import ACTIVATION_OBSERVERS, WEIGHT_OBSERVERS

    fields = QConfig.model_fields
    assert set(get_args(fields["weight_observer"].annotation)) == set(WEIGHT_OBSERVERS)
    assert set(get_args(fields["activation_observer"].annotation)) == set(ACTIVATION_OBSERVERS)


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ValueError, match=r"unknown key 'weight_bit' in QConfig.*'weight_bits'"):
        QConfig.from_dict({"weight_bit": 4})
