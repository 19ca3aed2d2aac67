"""Fold each BatchNorm that directly follows a Conv/Linear into that layer.

Which BatchNorm follows which layer is read off one real forward pass (no FX
tracing, so any eager model works): a pair is folded only when the layer's output
feeds the BatchNorm and nothing else, and both run exactly once per forward.
The folded BatchNorm is replaced by ``nn.Identity`` under its own name.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from adaround_core.torch_private import BatchNormBase, tree_leaves

logger = logging.getLogger(__name__)

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
             nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class _TensorUseCounter(TorchFunctionMode):
    """Counts, per tensor, the torch calls that consumed it and produced a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.uses: Counter[int] = Counter()
        self._alive: list[torch.Tensor] = []  # keep ids unique while tracing

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) for t in tree_leaves(out)):
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor):
                    self.uses[id(t)] += 1
                    self._alive.append(t)
        return out


def find_foldable_pairs(model: nn.Module, call_model) -> list[tuple[str, str]]:
    """``(layer_name, batchnorm_name)`` pairs found by running ``call_model(model)`` once."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, str] = {}  # id(output) -> layer name
    consumed: dict[str, int] = {}  # batchnorm name -> id(input)
    calls: Counter[str] = Counter()
    keep: list[Any] = []

    def after_layer(module, args, output):
        calls[names[module]] += 1
        produced[id(output)] = names[module]
        keep.append(output)

    def before_bn(module, args):
        calls[names[module]] += 1
        consumed[names[module]] = id(args[0])

    handles = [m.register_forward_hook(after_layer) for m in names if isinstance(m, _FOLDABLE)]
    handles += [m.register_forward_pre_hook(before_bn) for m in names if isinstance(m, _BATCHNORMS)]
    counter = _TensorUseCounter()
    try:
        with torch.no_grad(), counter:
            output = call_model(model)
    finally:
        for h in handles:
            h.remove()
    returned = {id(t) for t in tree_leaves(output) if isinstance(t, torch.Tensor)}
    pairs = []
    for bn, tensor_id in consumed.items():
        layer = produced.get(tensor_id)
        if (layer is not None and calls[layer] == 1 and calls[bn] == 1
                and counter.uses[tensor_id] == 1 and tensor_id not in returned):
            pairs.append((layer, bn))
    return pairs


def _bn_scale_shift(bn: BatchNormBase) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(a, b)`` with ``bn(y) = a * y + b`` in eval mode."""
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    weight = bn.weight if bn.affine else torch.ones_like(inv_std)
    bias = bn.bias if bn.affine else torch.zeros_like(inv_std)
    scale = weight * inv_std
    return scale, bias - bn.running_mean * scale


def _can_fold(layer: nn.Module, bn: nn.Module) -> bool:
    if bn.running_mean is None or not bn.track_running_stats:
        return False  # uses batch statistics even in eval mode
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        return layer.groups == 1
    return True


@torch.no_grad()
def fold_into_layer(layer: nn.Module, bn: nn.Module) -> None:
    """Rewrite ``layer``'s weight and bias so that ``layer`` alone equals ``bn(layer(x))``."""
    scale, shift = _bn_scale_shift(bn)
    axis = 1 if isinstance(layer, nn.modules.conv._ConvTransposeNd) else 0
    shape = [1] * layer.weight.dim()
    shape[axis] = -1
    layer.weight.mul_(scale.reshape(shape).to(layer.weight))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(scale)
    new_bias = (bias * scale + shift).to(layer.weight)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.copy_(new_bias)


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def fold_batchnorms(model: nn.Module, call_model) -> list[tuple[str, str]]:
    """Fold every BatchNorm that follows a Conv/Linear in ``model``; returns the pairs."""
    modules = dict(model.named_modules())
    folded = []
    for layer_name, bn_name in find_foldable_pairs(model, call_model):
        layer, bn = modules[layer_name], modules[bn_name]
        if _can_fold(layer, bn):
            fold_into_layer(layer, bn)
            _replace_module(model, bn_name, nn.Identity().train(bn.training))
            folded.append((layer_name, bn_name))
    logger.info("folded %d BatchNorm layers: %s", len(folded), folded)
    return folded
