"""Capture every layer's inputs and targets in one forward pass of each model.

:class:`OnePassCapture` keeps, per calibration batch, the quantized model's and the
float model's forward passes paused at the current layer (frontiers in a
:class:`~adaround_core.calibration.frontier_store.FrontierStore`). Asking for the
next layer continues both passes from there:

* the quantized pass runs from the previous layer's call (so that call uses the
  previous layer's weight as rounded meanwhile) up to the layer's call, whose argument
  through the layer's ``input_fake_quant`` is the input;
* the float pass runs through the layer's call, whose output is the target, then on
  towards the next layer's call through nodes that write into no tensor (it depends on
  no rounding, and the paused pass is then often smaller: a ResNet stem's output after
  pooling, a residual block's output instead of its two inputs).

A cut point may also be a block (``granularity: block``): its call's arguments in the
quantized pass are the inputs, its output in the float pass the target, as
:func:`~adaround_core.calibration.unit_capture.iter_unit_calls` captures them.

Both equal what :func:`~adaround_core.calibration.layer_capture.iter_layer_io` returns
after the same roundings, bit for bit, at about one forward pass of each model in all
instead of one partial pass per layer.

:meth:`OnePassCapture.save` (or a capture's ``sink``, written batch by batch) and
:meth:`OnePassCapture.resume` persist the paused passes at a layer boundary and continue
them in another process (a pipeline task per layer): resume needs the same model (traced
to the same graph) with the same layers rounded. With ``hold_budget`` a sink keeps
frontiers in this process's memory up to that many bytes instead of writing them
(:mod:`~adaround_core.calibration.held_frontiers`): only a resume in this process can
continue those.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from adaround_core.calibration.activation_codes import ActivationCodes, cached_input
from adaround_core.calibration.frontier_store import (
    FRONTIER_MEMORY_BUDGET,
    Consume,
    FrontierStore,
    FrontierWriter,
    frontier_manifest,
    frontiers_present,
    load_frontiers,
    save_frontiers,
)
from adaround_core.calibration.graph_trace import LayerGraph
from adaround_core.calibration.sample_store import CorruptCacheError
from adaround_core.calibration.segmented_forward import (
    Frontier,
    advance,
    advance_without_writes,
    call_arguments,
    node_arguments,
    start,
    step,
)
from adaround_core.calibration.unit_capture import copy_tensors
from adaround_core.calibration.unit_samples import Call

CAPTURE_STATE = "capture.json"
T = TypeVar("T")


class OnePassCapture:
    """Layer inputs and targets of ``layers``, taken in order, by continuing two passes.

    The caller rounds each layer (or leaves it) before asking for the next one.
    """

    def __init__(self, quant_model: nn.Module, float_model: nn.Module, graph: LayerGraph,
                 layers: list[str], batches: Iterable[Any],
                 memory_budget: int = FRONTIER_MEMORY_BUDGET, consume: Consume = False,
                 hold_budget: int = 0) -> None:
        self.quant_model, self.float_model, self.graph = quant_model, float_model, graph
        self._pending = list(layers)
        self._batches = batches
        self._quant = FrontierStore(memory_budget)
        self._float = FrontierStore(memory_budget)
        self._num_batches: int | None = None
        self._saved: Path | None = None  # the passes are paused on disk here
        self.consume = consume  # delete each file under _saved once it is read
        self.hold_budget = hold_budget  # bytes a sink may hold in memory (all held ones)

    def iter_layer_io(self, name: str, quantize_input: bool = True, sink: Path | None = None,
                      codes: bool = False,
                      ) -> Iterator[tuple[torch.Tensor | ActivationCodes, torch.Tensor]]:
        """Per batch: the layer's fake-quantized input (before ``input_fake_quant`` when
        ``quantize_input`` is False) and float output (streamed; read it to the end
        before rounding the layer). With ``sink`` (a directory, existing and empty) the
        passes paused at the layer are written there batch by batch, as :meth:`save`
        writes them, instead of kept: the next capture continues from that directory.
        With ``codes`` a fake-quantized input comes as its integer codes where its
        quantizer gives them (``input_fake_quant.codes``; they decode to the same tensor)."""
        return self._continue(name, sink, lambda quant, floating, continued: (
            self._input(name, quant, quantize_input, codes),
            self._target(floating, continued)))

    def iter_unit_calls(self, name: str, sink: Path | None = None) -> Iterator[Call]:
        """Per batch: block ``name``'s call ``(args, kwargs)`` in the quantized pass and
        its float output, copied as :func:`~.unit_capture.iter_unit_calls` copies them
        (streamed; read it to the end before rounding the block); ``sink`` as in
        :meth:`iter_layer_io`."""
        def take(quant: Frontier, floating: Frontier, continued: bool) -> Call:
            args, kwargs = call_arguments(self.graph.layer_node(name), quant.values)
            output = step(self.graph, self.float_model, floating)
            return copy_tensors(args), copy_tensors(kwargs), copy_tensors(output)
        return self._continue(name, sink, take)

    def _continue(self, name: str, sink: Path | None,
                  take: Callable[[Frontier, Frontier, bool], T]) -> Iterator[T]:
        """Per batch: ``take`` of both passes, continued up to the call of ``name``, and
        told whether this process continues the passes later (False when they are streamed
        to disk: then nothing runs on the taken tensors after they are written; and after
        the last layer, whose passes are dropped: no later layer needs them)."""
        if not self._pending or self._pending[0] != name:
            expected = self._pending[0] if self._pending else "none"
            raise ValueError(f"layer {name!r} asked out of order (next is {expected!r}); "
                             f"capture layers in rounding order")
        self._pending.pop(0)
        call = self.graph.layer_calls[name]
        writers = self._writers(Path(sink)) if sink is not None else None
        keep = writers is None and bool(self._pending)  # the last layer's passes end here
        count = 0
        try:
            for i, (quant, floating) in enumerate(self._frontiers()):
                advance(self.graph, self.quant_model, quant, call)
                advance(self.graph, self.float_model, floating, call)
                taken = take(quant, floating, keep)
                if self._pending:  # the float pass needs no rounding: on to the next call
                    advance_without_writes(self.graph, self.float_model, floating,
                                           self.graph.layer_calls[self._pending[0]])
                if keep:
                    self._quant.put(i, quant)
                    self._float.put(i, floating)
                elif writers is not None:
                    writers[0].write(quant)
                    writers[1].write(floating)
                count += 1
                yield taken
            for writer in writers or ():  # its last writes may fail too
                writer.finish()
        except BaseException:  # an abandoned boundary holds no memory
            for writer in writers or ():
                writer.abandon()
            raise
        self._num_batches = count
        self._saved = None  # the passes are in the stores now ...
        if writers is not None:
            self._write_state(Path(sink))
            self._saved = Path(sink)  # ... or in the sink, continued from there

    def _writers(self, directory: Path) -> tuple[FrontierWriter, FrontierWriter]:
        writers = []
        for part in ("quant", "float"):
            (directory / part).mkdir()
            writers.append(FrontierWriter(directory / part, self.graph.fingerprint,
                                          self.hold_budget))
        return writers[0], writers[1]

    def capture_layer_io(self, name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """All of :meth:`iter_layer_io` as two lists (inputs, targets), in memory."""
        pairs = list(self.iter_layer_io(name))
        return [x for x, _ in pairs], [y for _, y in pairs]

    def _frontiers(self) -> Iterator[tuple[Frontier, Frontier]]:
        if self._saved is not None:  # read back batch by batch, each checked as it is read
            fingerprint = self.graph.fingerprint
            yield from zip(load_frontiers(self._saved / "quant", fingerprint, consume=self.consume),
                           load_frontiers(self._saved / "float", fingerprint, consume=self.consume),
                           strict=True)
            return
        if self._num_batches is None:
            for i, batch in enumerate(self._batches):
                yield start(self.graph, batch, i), start(self.graph, batch, i)
            return
        for i in range(self._num_batches):
            yield self._quant.take(i), self._float.take(i)

    def _input(self, name: str, frontier: Frontier, quantize: bool,
               codes: bool = False) -> torch.Tensor | ActivationCodes:
        (arg,), _ = node_arguments(self.graph.layer_node(name), frontier.values)
        return cached_input(self.quant_model.get_submodule(name), arg, quantize, codes)

    def _target(self, frontier: Frontier, continued: bool) -> torch.Tensor:
        """Run the layer's call in the float pass; its output (a copy if the pass is
        ``continued`` here and a later node reads it, which may change it in place)."""
        output = step(self.graph, self.float_model, frontier).detach()
        later = continued and self.graph.nodes[frontier.position - 1].users
        return output.clone() if later else output

    def save(self, directory: Path) -> None:
        """Persist the paused passes and the layers still to capture under ``directory``
        (existing, empty): ``quant/``, ``float/`` and ``capture.json``, written last."""
        if self._num_batches is None or self._saved is not None:
            raise ValueError("nothing held to save: save after capturing a layer from the "
                             "batches, or stream the passes to a sink")
        directory = Path(directory)
        for part, store in (("quant", self._quant), ("float", self._float)):
            (directory / part).mkdir()
            save_frontiers(directory / part, _borrowed(store, self._num_batches),
                           self.graph.fingerprint)
        self._write_state(directory)

    def _write_state(self, directory: Path) -> None:
        tmp = directory / f".{CAPTURE_STATE}.tmp"
        tmp.write_text(json.dumps({"pending": self._pending, "batches": self._num_batches}))
        os.replace(tmp, directory / CAPTURE_STATE)

    @classmethod
    def resume(cls, quant_model: nn.Module, float_model: nn.Module, graph: LayerGraph,
               directory: Path, memory_budget: int = FRONTIER_MEMORY_BUDGET,
               consume: Consume = False, hold_budget: int = 0) -> OnePassCapture:
        """Continue passes saved by :meth:`save` (or to a sink); ``quant_model`` must
        have the layers captured before the save rounded (the next capture runs the last
        one's call). The manifests and files are checked here; each frontier's checksum
        when it is read (a mismatch raises :class:`CorruptCacheError` from the next
        capture). With ``consume`` the next capture deletes each file once read (the disk
        peak is then one boundary's frontiers, not two; an interrupted capture leaves the
        directory unusable; a callable is given each file to delete instead, see
        :func:`~.frontier_store.load_frontiers`). Frontiers held in memory are taken whether or not
        ``consume``; a boundary with held ones that this process does not hold is
        unusable (:class:`CorruptCacheError`); ``hold_budget`` is that of the next sink."""
        directory = Path(directory)
        state_file = directory / CAPTURE_STATE
        if not state_file.exists():
            raise CorruptCacheError(f"no {CAPTURE_STATE} in {directory} (save incomplete)")
        state = json.loads(state_file.read_text())
        for part in ("quant", "float"):
            manifest = frontier_manifest(directory / part, graph.fingerprint)
            if len(manifest["files"]) != state["batches"] or \
                    not frontiers_present(directory / part, manifest):
                raise CorruptCacheError(f"frontiers in {directory} are incomplete (held in "
                                        f"the memory of the process that wrote them, or "
                                        f"consumed by an interrupted capture)")
        capture = cls(quant_model, float_model, graph, state["pending"], (), memory_budget,
                      consume, hold_budget)
        capture._num_batches = state["batches"]
        capture._saved = directory
        return capture

    @property
    def pending(self) -> list[str]:
        """The layers still to capture, in order."""
        return list(self._pending)

    def close(self) -> None:
        """Drop the paused passes and their temporary files."""
        self._quant.close()
        self._float.close()

    @property
    def frontiers_on_disk(self) -> int:
        return self._quant.spilled + self._float.spilled


def _borrowed(store: FrontierStore, count: int) -> Iterator[Frontier]:
    """Each frontier of ``store`` in turn, put back once the consumer is done with it."""
    for i in range(count):
        frontier = store.take(i)
        yield frontier
        store.put(i, frontier)

