"""Capture a reconstruction unit's calls: its arguments in the quantized model, its float output.

A unit is a module named by its qualified name (a block such as ``layer1.0``, or one layer).
Per batch, the quantized model runs until the unit has been called for the last time (the
earlier units as rounded so far, activation fake-quant on); the arguments of each call
``(args, kwargs)``, before any of the unit's own fake quantizers, are the inputs. The float
model runs the same batch and the unit's output there is the target (float model, float
input: the layer path's convention, eq. 25 of AdaRound, BRECQ's asymmetric reconstruction).
Tensors are copied, so later in-place operations of the forward pass cannot change them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from adaround_core.calibration.layer_capture import iter_module_calls
from adaround_core.calibration.unit_samples import Call
from adaround_core.torch_private import tree_map


def copy_tensors(tree: Any) -> Any:
    """``tree`` with every tensor detached and cloned."""
    return tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, tree)


def iter_unit_calls(quant_model: nn.Module, float_model: nn.Module, unit: str,
                    expected_calls: int, batches: Iterable[Any]) -> Iterator[Call]:
    """Per batch (and per call of ``unit``): ``(args, kwargs, float output)``."""
    def take_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return copy_tensors(args), copy_tensors(kwargs)

    pairs = iter_module_calls(quant_model, float_model, unit, expected_calls, batches,
                              take_input, copy_tensors)
    for (args, kwargs), output in pairs:
        yield args, kwargs, output


def capture_unit_calls(quant_model: nn.Module, float_model: nn.Module, unit: str,
                       expected_calls: int, batches: Iterable[Any]) -> list[Call]:
    """All of :func:`iter_unit_calls`, in memory."""
    return list(iter_unit_calls(quant_model, float_model, unit, expected_calls, batches))
