"""``prepare_qat_fx``: turn a float model into a fake-quant model ready for calibration."""

from __future__ import annotations

import copy
import logging
from typing import Any

from torch import nn

from adaround_core.calibration.batches import call_model
from adaround_core.calibration.graph_trace import mark_skippable
from adaround_core.quant.bn_folding import fold_batchnorms
from adaround_core.quant.fake_quantize import FakeQuantState, fake_quantizers
from adaround_core.quant.model_modes import fake_quant_state
from adaround_core.quant.qconfig import QConfig
from adaround_core.quant.quant_layers import (
    QUANT_LAYER_TYPES,
    QuantLayerMixin,
    QuantMultiheadAttention,
)

logger = logging.getLogger(__name__)


def prepare_qat_fx(model: nn.Module, qconfig: QConfig | None = None,
                   example_inputs: Any = None, inplace: bool = False) -> nn.Module:
    """Return a fake-quant copy of ``model`` (the seed's ``prepare_qat_fx``).

    Every Conv/Linear (and ``nn.MultiheadAttention.out_proj``) becomes a quantized
    layer under its original qualified name, with an input activation fake-quant and
    a per-channel weight fake-quant. BatchNorms following a Conv/Linear are folded:
    with ``example_inputs`` (a model input, a tuple of positional arguments or a dict
    of keyword arguments) right away, otherwise during the first eval-mode forward.
    The returned model starts in the FLOAT state.
    """
    qconfig = qconfig or QConfig()
    if fake_quantizers(model):
        raise ValueError("prepare_qat_fx: the model is already prepared")
    model = model if inplace else copy.deepcopy(model)
    if qconfig.fold_batchnorm and example_inputs is not None:
        fold_batchnorms(model, lambda m: call_model(m, example_inputs))
    swapped = _swap_layers(model, qconfig)
    if not swapped:
        raise ValueError("prepare_qat_fx: the model has no Conv/Linear layer to quantize")
    _disable_fused_transformer_paths(model)
    if qconfig.fold_batchnorm and example_inputs is None:
        _fold_at_first_forward(model)
    logger.info("prepared %d layers for W%s/A%s", len(swapped), qconfig.weight_bits,
                qconfig.activation_bits)
    return model


def _swap_layers(model: nn.Module, qconfig: QConfig) -> list[str]:
    swapped = []
    for name, module in model.named_modules():
        if type(module) is nn.MultiheadAttention:
            module.__class__ = QuantMultiheadAttention
        quant_type = QUANT_LAYER_TYPES.get(type(module))
        if quant_type is not None:
            module.__class__ = quant_type
            module.attach_fake_quants(qconfig)
            swapped.append(name)
    return swapped


def _noop_pre_hook(module: nn.Module, args: Any) -> None:
    return None


mark_skippable(_noop_pre_hook)  # no effect on the math: a traced graph may leave it out


def _disable_fused_transformer_paths(model: nn.Module) -> None:
    """``nn.TransformerEncoderLayer``'s fused inference path reads the weights directly and
    would skip the quantized layers; it is not taken while a hook is attached."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            module.register_forward_pre_hook(_noop_pre_hook)


def _fold_at_first_forward(model: nn.Module) -> None:
    """Fold BatchNorms on the first eval-mode forward, before any observer sees a tensor."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training or not getattr(module, "_batchnorm_fold_pending", False):
            return  # in train mode running statistics are not what the model computes
        module._batchnorm_fold_pending = False
        with fake_quant_state(module, FakeQuantState.FLOAT):
            fold_batchnorms(module, lambda m: m(*args, **kwargs))

    model._batchnorm_fold_pending = True  # a flag, not a handle: survives deepcopy correctly
    mark_skippable(hook, when=lambda m: not getattr(m, "_batchnorm_fold_pending", False))
    model.register_forward_pre_hook(hook, with_kwargs=True)


def is_prepared(model: nn.Module) -> bool:
    """Whether ``model`` came out of :func:`prepare_qat_fx`."""
    return any(isinstance(m, QuantLayerMixin) for m in model.modules())
