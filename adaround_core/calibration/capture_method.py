"""Choose how layer inputs are captured: one continued pass, or a pass per layer.

:func:`layer_capturer` traces the model once. When the graph can be cut before each
layer (see :mod:`~adaround_core.calibration.graph_trace`) and reproduces the eager
forward pass exactly on the first batch, capture continues one forward pass of each
model (:class:`~adaround_core.calibration.one_pass_capture.OnePassCapture`). Otherwise
it falls back to :func:`~adaround_core.calibration.layer_capture.iter_layer_io` (a
partial pass per layer, about L²/2 in all) and logs a warning saying why. With
``granularity: block`` the cut points are the units, blocks among them
(:meth:`LayerCapturer.iter_unit_calls`; the fallback:
:func:`~adaround_core.calibration.unit_capture.iter_unit_calls`, passes per unit).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adaround_core.calibration.batches import call_model
from adaround_core.calibration.frontier_store import FRONTIER_MEMORY_BUDGET
from adaround_core.calibration.graph_trace import NotSegmentable, trace_layer_graph
from adaround_core.calibration.layer_capture import iter_layer_io
from adaround_core.calibration.one_pass_capture import OnePassCapture
from adaround_core.calibration.segmented_forward import matches_eager
from adaround_core.calibration.unit_capture import iter_unit_calls
from adaround_core.calibration.unit_samples import Call

logger = logging.getLogger(__name__)

ONE_PASS = "one_pass"
PER_LAYER = "per_layer"


@dataclass
class LayerCapturer:
    """Captures the layers of one rounding run, in order; ``method`` says how, and
    ``note`` why the one-pass method was not used (empty when it was)."""

    quant_model: nn.Module
    float_model: nn.Module
    batches: Iterable[Any]
    method: str = PER_LAYER
    note: str = ""
    one_pass: OnePassCapture | None = field(default=None, repr=False)

    def iter_layer_io(self, name: str, calls: int, quantize_input: bool = True,
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per batch (and per call): the layer's quantized input (its input before
        ``input_fake_quant`` when ``quantize_input`` is False) and float output."""
        if self.one_pass is not None:
            return self.one_pass.iter_layer_io(name, quantize_input)
        return iter_layer_io(self.quant_model, self.float_model, name, calls, self.batches,
                             quantize_input)

    def iter_unit_calls(self, name: str, calls: int) -> Iterator[Call]:
        """Per batch (and per call): block ``name``'s arguments ``(args, kwargs)`` in the
        quantized model and its float output."""
        if self.one_pass is not None:
            return self.one_pass.iter_unit_calls(name)
        return iter_unit_calls(self.quant_model, self.float_model, name, calls, self.batches)

    def capture_layer_io(self, name: str, calls: int, quantize_input: bool = True,
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pairs = list(self.iter_layer_io(name, calls, quantize_input))
        return [x for x, _ in pairs], [y for _, y in pairs]

    def close(self) -> None:
        if self.one_pass is not None:
            self.one_pass.close()


def layer_capturer(quant_model: nn.Module, float_model: nn.Module, layers: list[str],
                   batches: Iterable[Any], first_batch: Any, leaf_types: tuple[type, ...],
                   one_pass: bool = True, memory_budget: int = FRONTIER_MEMORY_BUDGET,
                   blocks: Collection[str] = ()) -> LayerCapturer:
    """A capturer for ``layers`` (in rounding order; those in ``blocks`` are block units)
    of the two models, which must be in the state capture runs in (eval, fake quant as for
    rounding). ``memory_budget``: frontier bytes per model kept in memory, the rest on disk."""
    capturer = LayerCapturer(quant_model, float_model, batches)
    if not one_pass:
        capturer.note = "one-pass capture switched off"
        return capturer
    try:
        graph = trace_layer_graph(quant_model, layers, leaf_types, first_batch, blocks)
        with torch.no_grad():
            eager = call_model(quant_model, first_batch)
        if not matches_eager(graph, quant_model, first_batch, eager):
            raise NotSegmentable("the traced graph's output differs from the eager forward "
                                 "pass on the first batch")
    except NotSegmentable as reason:
        capturer.note = str(reason)
        logger.warning("one-pass capture does not apply: %s; capturing each %s with its "
                       "own forward passes (about %s²/2 in all)", reason,
                       *(("unit", "U") if blocks else ("layer", "L")))
        return capturer
    capturer.method = ONE_PASS
    capturer.one_pass = OnePassCapture(quant_model, float_model, graph, layers, batches,
                                       memory_budget)
    return capturer
