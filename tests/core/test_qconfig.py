"""``QConfig`` defaults and validation."""

from __future__ import annotations

import dataclasses

import pytest

from adaround_core.qconfig import QConfig


def test_defaults():
    q = QConfig()
    assert (q.weight_bits, q.activation_bits) == (4, 8)
    assert (q.weight_observer, q.activation_observer) == ("minmax", "minmax")
    assert q.fold_batchnorm is True


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        QConfig().weight_bits = 8


@pytest.mark.parametrize("bits", [2, 8])
def test_weight_bits_bounds_accepted(bits):
    assert QConfig(weight_bits=bits).weight_bits == bits


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragment"),
    [
        ({"weight_bits": 1}, ValueError, "weight_bits"),
        ({"weight_bits": 9}, ValueError, "weight_bits"),
        ({"weight_bits": True}, TypeError, "weight_bits"),
        ({"weight_bits": 4.0}, TypeError, "weight_bits"),
        ({"activation_bits": 1}, ValueError, "activation_bits"),
        ({"activation_bits": 17}, ValueError, "activation_bits"),
        ({"weight_observer": "percentile"}, ValueError, "weight_observer"),
        ({"activation_observer": "max"}, ValueError, "activation_observer"),
        ({"percentile": 50.0}, ValueError, "percentile"),
        ({"percentile": 100.5}, ValueError, "percentile"),
    ],
)
def test_invalid_values_name_the_field(kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment):
        QConfig(**kwargs)


def test_float_activations_allowed():
    assert QConfig(activation_bits=None).activation_bits is None
