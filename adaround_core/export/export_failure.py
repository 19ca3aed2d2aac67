"""Naming the module behind an export failure.

``torch.onnx.export`` says which operator it cannot express (``aten::fft_rfft``), not where
the model uses it. :func:`failing_module` exports each module alone, with the inputs it
received in one forward pass, innermost first: the first that fails is the one to replace.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import torch
from torch import nn

from adaround_core.calibration.batches import call_model

UNSUPPORTED = (torch.onnx.errors.UnsupportedOperatorError, torch.onnx.errors.SymbolicValueError)


class UnsupportedExportError(ValueError):
    """The model uses an operation the ONNX exporter cannot express."""


def _first_calls(model: nn.Module, example: Any) -> dict[nn.Module, tuple[tuple, dict]]:
    """Each module's positional and keyword arguments at its first call."""
    calls: dict[nn.Module, tuple[tuple, dict]] = {}

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.setdefault(module, (args, kwargs))

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules()]
    try:
        with torch.no_grad():
            call_model(model, example)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _exports(module: nn.Module, args: tuple, kwargs: dict, opset: int) -> bool:
    if not all(isinstance(a, torch.Tensor) for a in args):
        return True  # not exportable alone for other reasons: not the culprit we look for
    inputs = (*args, kwargs) if kwargs else args
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, inputs, io.BytesIO(), dynamo=False, opset_version=opset)
        except UNSUPPORTED:
            return False
        except Exception:  # noqa: BLE001 - fails alone for another reason (its inputs/outputs)
            return True
    return True


def failing_module(model: nn.Module, example: Any, opset: int) -> tuple[str, nn.Module]:
    """The innermost module (qualified name, module) whose own export fails; the model
    itself (name ``""``) when every submodule exports alone."""
    calls = _first_calls(model, example)
    for name, module in reversed(list(model.named_modules())):  # descendants first
        if module in calls and name and not _exports(module, *calls[module], opset):
            return name, module
    return "", model


def unsupported_error(model: nn.Module, example: Any, opset: int,
                      error: Exception) -> UnsupportedExportError:
    """The one-line error for an export that failed on an operator, naming the module."""
    name, module = failing_module(model, example, opset)
    where = f"module {name!r} ({type(module).__name__})" if name else (
        f"the forward of the model itself ({type(module).__name__})")
    reason = str(error).split("\n")[0]
    return UnsupportedExportError(
        f"ONNX export failed in {where}: {reason}. Replace that operation with ones ONNX "
        f"opset {opset} has (or raise the opset), or export the model without that module")
