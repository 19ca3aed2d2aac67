"""A layer's learned activation qparams in its result file: the scale and zero point of its
input fake-quant after ``activation_lr`` trained them, and writing them back into a model."""

from __future__ import annotations

import torch

from adaround_core.quant.fake_quantize import FakeQuantize
from adaround_core.quant.quant_layers import QuantLayerMixin

INPUT_SCALE = "input_scale"  # result-file tensors, present only when the qparams changed
INPUT_ZERO_POINT = "input_zero_point"


def _quantizer(layer: QuantLayerMixin) -> FakeQuantize | None:
    fq = layer.input_fake_quant
    return fq if isinstance(fq, FakeQuantize) else None


def input_qparams(layer: QuantLayerMixin) -> tuple[torch.Tensor, ...]:
    """A copy of the layer's input qparams (scale, zero point, frozen flag); empty when its
    input is not fake-quantized."""
    fq = _quantizer(layer)
    if fq is None:
        return ()
    return fq.scale.detach().clone(), fq.zero_point.detach().clone(), fq.frozen.detach().clone()


def learned_input_qparams(layer: QuantLayerMixin,
                          before: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """The result-file tensors of the layer's input qparams if they differ from ``before``
    (:func:`input_qparams` taken before rounding), else nothing."""
    after = input_qparams(layer)
    if all(torch.equal(a, b) for a, b in zip(after, before, strict=True)):
        return {}
    return {INPUT_SCALE: after[0], INPUT_ZERO_POINT: after[1]}


@torch.no_grad()
def apply_input_qparams(layer: QuantLayerMixin, name: str,
                        tensors: dict[str, torch.Tensor]) -> None:
    """Write learned input qparams of a result (if it has any) into ``layer`` and freeze
    them, as the engine leaves them."""
    if INPUT_SCALE not in tensors:
        return
    fq = _quantizer(layer)
    scale, zero_point = tensors[INPUT_SCALE], tensors[INPUT_ZERO_POINT]
    if fq is None or fq.scale.shape != scale.shape:
        raise ValueError(f"result for {name!r} has an input scale of shape "
                         f"{tuple(scale.shape)} the layer's input quantizer does not take; "
                         f"the model changed since the results were made: delete them and rerun")
    fq.scale.copy_(scale)
    fq.zero_point.copy_(zero_point)
    fq.freeze()
