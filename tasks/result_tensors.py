"""The tensors of a unit's result file: each rounded layer's weight and, when AdaRound learned
them, its input qparams (:mod:`tasks.input_qparams`). A layer's are named ``weight``,
``input_scale``, ``input_zero_point`` (the files plain AdaRound always wrote); a block's
``<layer>:weight`` and so on, for every layer of the block."""

from __future__ import annotations

import torch

from adaround_core.quant.quant_layers import QuantLayerMixin
from tasks.input_qparams import input_qparams, learned_input_qparams

SEPARATOR = ":"


def snapshot(layers: dict[str, QuantLayerMixin], names: tuple[str, ...]) -> dict[str, tuple]:
    """The input qparams of ``names`` before rounding, to tell learned ones by."""
    return {name: input_qparams(layers[name]) for name in names}


def unit_tensors(layers: dict[str, QuantLayerMixin], before: dict[str, tuple],
                 block: bool) -> dict[str, torch.Tensor]:
    """The result tensors of the layers in ``before`` (:func:`snapshot`), as rounded now."""
    tensors = {}
    for name, qparams in before.items():
        own = {"weight": layers[name].weight.detach(),
               **learned_input_qparams(layers[name], qparams)}
        tensors |= {(f"{name}{SEPARATOR}{key}" if block else key): t for key, t in own.items()}
    return tensors


def layer_tensors(tensors: dict[str, torch.Tensor], name: str, block: bool,
                  ) -> dict[str, torch.Tensor]:
    """Layer ``name``'s tensors of a result, under the names a layer's result uses."""
    if not block:
        return tensors
    prefix = f"{name}{SEPARATOR}"
    return {key.removeprefix(prefix): t for key, t in tensors.items() if key.startswith(prefix)}
