"""``QConfig``: how weights and activations of a prepared model are quantized."""

from __future__ import annotations

from dataclasses import dataclass

from adaround_core.observers import ACTIVATION_OBSERVERS, WEIGHT_OBSERVERS

WEIGHT_BITS_RANGE = (2, 8)
ACTIVATION_BITS_RANGE = (2, 16)


@dataclass(frozen=True)
class QConfig:
    """Quantization settings applied by :func:`prepare_qat_fx`.

    Weights are symmetric per output channel; activations (the input of every
    quantized layer) are affine per tensor, or float when ``activation_bits`` is None.
    """

    weight_bits: int = 4
    activation_bits: int | None = 8
    weight_observer: str = "minmax"  # "minmax" | "mse"
    activation_observer: str = "minmax"  # "minmax" | "mse" | "percentile"
    percentile: float = 99.99  # used by the "percentile" activation observer
    fold_batchnorm: bool = True

    def __post_init__(self) -> None:
        _check_bits("weight_bits", self.weight_bits, WEIGHT_BITS_RANGE)
        if self.activation_bits is not None:
            _check_bits("activation_bits", self.activation_bits, ACTIVATION_BITS_RANGE)
        _check_choice("weight_observer", self.weight_observer, WEIGHT_OBSERVERS)
        _check_choice("activation_observer", self.activation_observer, ACTIVATION_OBSERVERS)
        if not 50.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"QConfig.percentile must be in (50, 100], got {self.percentile!r}")


def _check_bits(name: str, value: object, bounds: tuple[int, int]) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"QConfig.{name} must be an int, got {type(value).__name__}")
    if not bounds[0] <= value <= bounds[1]:
        raise ValueError(f"QConfig.{name} must be in [{bounds[0]}, {bounds[1]}], got {value}")


def _check_choice(name: str, value: object, choices: dict) -> None:
    if value not in choices:
        raise ValueError(f"QConfig.{name} must be one of {sorted(choices)}, got {value!r}")
