"""``QConfig``: how weights and activations of a prepared model are quantized."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from adaround_core.config import EngineConfig

WEIGHT_BITS_RANGE = (2, 8)
ACTIVATION_BITS_RANGE = (2, 16)
PERCENTILE_RANGE = (50.0, 100.0)  # exclusive, inclusive


class QConfig(EngineConfig):
    """Quantization settings applied by :func:`prepare_qat_fx`.

    Weights are symmetric per output channel; activations (the input of every
    quantized layer) are affine per tensor, or float when ``activation_bits`` is None.
    """

    config_label: ClassVar[str] = "QConfig"

    weight_bits: int = Field(4, ge=WEIGHT_BITS_RANGE[0], le=WEIGHT_BITS_RANGE[1])
    activation_bits: int | None = Field(8, ge=ACTIVATION_BITS_RANGE[0],
                                        le=ACTIVATION_BITS_RANGE[1])
    weight_observer: Literal["minmax", "mse"] = "minmax"
    activation_observer: Literal["minmax", "mse", "percentile"] = "minmax"
    percentile: float = Field(99.99, gt=PERCENTILE_RANGE[0], le=PERCENTILE_RANGE[1],
                              description="used by the 'percentile' activation observer")
    fold_batchnorm: bool = True
