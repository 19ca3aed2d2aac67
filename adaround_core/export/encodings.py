"""Encodings in the layout of AIMET's ``.encodings`` file (version 0.6.1).

Each entry: ``bitwidth``, ``dtype`` ("int"), ``is_symmetric`` ("True"/"False"), ``scale``,
``offset``, ``min``, ``max``, with AIMET's convention ``x = (q + offset) * scale`` over the
unsigned range ``q in [0, 2^b - 1]``: an affine activation with zero point ``z`` has offset
``-z``; a symmetric signed weight has offset ``-2^(b-1)``. Parameters have one entry per
output channel.
"""

from __future__ import annotations

from typing import Any

from adaround_core.quant.fake_quantize import FakeQuantize
from adaround_core.quant.quant_layers import QuantLayerMixin

ENCODING_VERSION = "0.6.1"


def _entry(scale: float, offset: int, bits: int, symmetric: bool) -> dict[str, Any]:
    top = 2**bits - 1
    return {"bitwidth": bits, "dtype": "int", "is_symmetric": str(symmetric),
            "scale": scale, "offset": offset, "min": offset * scale,
            "max": (top + offset) * scale}


def activation_encoding(fq: FakeQuantize) -> dict[str, Any]:
    """The encoding of an affine per-tensor activation quantizer."""
    bits = (fq.qmax - fq.qmin + 1).bit_length() - 1
    return _entry(float(fq.scale.reshape(-1)[0]), -int(fq.zero_point.reshape(-1)[0]), bits,
                  symmetric=False)


def weight_encodings(layer: QuantLayerMixin) -> list[dict[str, Any]]:
    """Per-output-channel encodings of a layer's symmetric weight quantizer (as exported:
    the stand-in holds the same scales as the layer's fake quantizer)."""
    fq = layer.weight_fake_quant
    bits = (fq.qmax - fq.qmin + 1).bit_length() - 1
    return [_entry(float(s), fq.qmin, bits, symmetric=True) for s in fq.scale.reshape(-1)]


def encodings_file(activations: dict[str, list], params: dict[str, list]) -> dict[str, Any]:
    """The whole file: activation and parameter encodings keyed by ONNX tensor name."""
    return {"version": ENCODING_VERSION, "activation_encodings": activations,
            "param_encodings": params, "excluded_layers": [],
            "quantizer_args": {"dtype": "int", "per_channel_quantization": True,
                               "is_symmetric": True, "quant_scheme": "adaround"}}
