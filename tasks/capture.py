"""How a layer's task captures its inputs: by continuing the previous layer's forward pass.

The plan decides once per stage (:func:`capture_verdict`, the engine's
:func:`~adaround_core.calibration.capture_method.layer_capturer`): where the model's
graph can be cut before each layer and reproduces the eager pass bit for bit, the
layers' tasks share one forward pass of each model over the calibration set. Layer
``k``'s task continues the passes its predecessor saved at layer ``k-1``'s boundary
(:meth:`LayerJob.upstream_frontier_dir`), captures layer ``k``, and leaves the passes
paused at its own boundary for layer ``k+1`` (the ``sink`` of :meth:`LayerCapture.pairs`:
each batch's paused passes are written as the batch is captured, so a task holds one
batch at a time and serialises each frontier once). Without a
usable saved boundary (the first layer, a deleted or corrupt one) the pass starts at
the model's input: one partial pass, the same tensors. Where the graph cannot be cut,
every task captures its layer with a partial pass per batch (the per-layer method), as
``weight_reconstruction`` does. Both give bit-identical inputs and targets. With
``granularity: block`` the units are the cut points and a block's task captures its calls
(:meth:`LayerCapture.calls`) the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaround_core.calibration.activation_codes import ActivationCodes
from adaround_core.calibration.capture_method import ONE_PASS, PER_LAYER, layer_capturer
from adaround_core.calibration.graph_trace import LayerGraph, NotSegmentable, trace_layer_graph
from adaround_core.calibration.layer_capture import iter_layer_io
from adaround_core.calibration.one_pass_capture import OnePassCapture
from adaround_core.calibration.sample_store import CorruptCacheError
from adaround_core.calibration.unit_capture import iter_unit_calls
from adaround_core.calibration.unit_samples import Call
from adaround_core.quant.fake_quantize import FakeQuantize
from adaround_core.quant.quant_layers import QuantLayerMixin
from adaround_core.reconstruction.rounding_mode import rounding_mode
from tasks.cache_removal import unlink_in_background
from tasks.layer_jobs import LayerJob
from tasks.model_state import prepared_key
from tasks.process_memo import ProcessMemo
from tasks.run_logging import run_logger

LEAF_TYPES = (QuantLayerMixin, FakeQuantize)  # the graph's opaque calls, as the library's
# Capture by continuing one pass where the model allows it (True), or always with a
# partial pass per layer (False: the method before one-pass capture, for equality tests
# and benchmarks; the library's switch is weight_reconstruction.ONE_PASS_CAPTURE).
ONE_PASS_CAPTURE = True
KEY_FILE = "key"  # in a frontier directory: the full cache key of the layer that saved it


def capture_verdict(model: nn.Module, names: list[str], batch: torch.Tensor,
                    num_threads: int | None, blocks: list[str] | None = None,
                    ) -> tuple[str, str]:
    """``(method, note)`` for rounding the units ``names`` (``blocks`` among them) of the
    calibrated ``model``: the engine's choice (which logs a warning when one-pass capture
    does not apply), made once per run."""
    with rounding_mode(model, num_threads):
        # the float model is only stored by the capturer until a layer is captured
        capturer = layer_capturer(model, model, names, (), batch, LEAF_TYPES, ONE_PASS_CAPTURE,
                                  blocks=blocks or ())
        capturer.close()
    return capturer.method, capturer.note


@dataclass
class LayerCapture:
    """One task's capture of its layer: :meth:`pairs` (per batch, the quantized input and
    the float target), then :meth:`save` of the paused passes for the next layer.
    ``source`` says where the capture started, for the log."""

    job: LayerJob
    model: nn.Module
    reference: nn.Module
    batches: Sequence[torch.Tensor]
    one_pass: OnePassCapture | None
    source: str

    @property
    def method(self) -> str:
        return PER_LAYER if self.one_pass is None else ONE_PASS

    def pairs(self, sink: Path | None = None,
              ) -> Iterator[tuple[torch.Tensor | ActivationCodes, torch.Tensor]]:
        """Per batch, the layer's input (before its activation fake-quant when that is
        trained, :attr:`LayerJob.quantizes_input`; fake-quantized, as integer codes where
        its quantizer gives them) and float output; the passes paused at the layer are
        written into ``sink`` (from :meth:`frontier_sink`) as they go."""
        quantize = self.job.quantizes_input
        if self.one_pass is not None:
            return self.one_pass.iter_layer_io(self.job.name, quantize, sink, codes=True)
        return iter_layer_io(self.model, self.reference, self.job.name, self.job.calls,
                             self.batches, quantize, codes=True)

    def calls(self, sink: Path | None = None) -> Iterator[Call]:
        """Per batch, the block's call ``(args, kwargs)`` and float output; ``sink`` as in
        :meth:`pairs`."""
        if self.one_pass is not None:
            return self.one_pass.iter_unit_calls(self.job.name, sink)
        return iter_unit_calls(self.model, self.reference, self.job.name, self.job.calls,
                               self.batches)

    @property
    def saves_frontiers(self) -> bool:
        """Whether a later layer continues this capture (ask before reading the layer)."""
        return self.one_pass is not None and len(self.one_pass.pending) > 1

    def frontier_sink(self, directory: Path) -> Path:
        """``directory`` (existing, empty) labelled with this layer's cache key, as the
        sink of :meth:`pairs` (or :meth:`calls`): the passes paused at this layer's
        boundary, complete when that ends."""
        assert self.one_pass is not None
        (directory / KEY_FILE).write_text(self.job.cache_key)
        return directory

    def close(self) -> None:
        if self.one_pass is not None:
            self.one_pass.close()


def open_capture(job: LayerJob, model: nn.Module, reference: nn.Module,
                 batches: Sequence[torch.Tensor], upstream: bool = True) -> LayerCapture:
    """The capture of ``job``'s layer; ``model`` (earlier layers rounded) and ``reference``
    in the state capture runs in (:func:`rounding_mode`). With ``upstream`` it continues
    the passes the previous layer's task saved, where there are any; saved passes that
    cannot be used raise :class:`CorruptCacheError` (here or while the capture is read)."""
    if job.chain is None:
        return LayerCapture(job, model, reference, batches, None, "per-layer passes")
    order = list(job.chain.order)
    try:
        graph = _layer_graph(job, model, batches)
    except NotSegmentable as reason:  # the plan traced the same model: not expected
        run_logger(__name__).warning("%s: one-pass capture does not apply (%s); capturing "
                                     "with per-layer passes", job.name, reason)
        return LayerCapture(job, model, reference, batches, None, "per-layer passes")
    resumed = _resume(job, model, reference, graph) if upstream else None
    if resumed is not None:
        return LayerCapture(job, model, reference, batches, resumed,
                            f"continued from {job.upstream_frontier_dir()}")
    capture = OnePassCapture(model, reference, graph, order[order.index(job.name):], batches,
                             hold_budget=hold_budget(job))
    return LayerCapture(job, model, reference, batches, capture, "from the model input")


_GRAPHS: ProcessMemo[LayerGraph] = ProcessMemo(kept=2)  # traced graphs of this process


def _layer_graph(job: LayerJob, model: nn.Module, batches: Sequence[Any]) -> LayerGraph:
    """The graph of the job's plan, traced once per process: every layer's task rebuilds
    the same prepared model (other weights, the same modules and names), and tracing it
    reads the first calibration batch (at 224 px, about 1 s a task in all)."""
    assert job.chain is not None
    key = (prepared_key(job.params, job.dataset, job.float_model, job.calibrated),
           job.chain.order, job.chain.blocks)
    return _GRAPHS.get(key, lambda: trace_layer_graph(model, list(job.chain.order), LEAF_TYPES,
                                                      batches[0], job.chain.blocks))


def hold_budget(job: LayerJob) -> int:
    """Bytes of frontiers the job's capture may hand to the next layer in memory
    (``runtime.frontier_memory_mb``; none when caches are kept: kept frontiers must
    outlive this process)."""
    runtime = job.params.runtime
    return 0 if runtime.keep_cache else runtime.frontier_memory_mb << 20


def _resume(job: LayerJob, model: nn.Module, reference: nn.Module,
            graph: LayerGraph) -> OnePassCapture | None:
    """The passes the previous layer's task saved, continued; None when there are none
    (or they were saved for another plan); :class:`CorruptCacheError` when they are
    unusable."""
    directory = job.upstream_frontier_dir()
    if directory is None:
        return None
    log = run_logger(__name__)
    if not directory.is_dir():
        log.info("%s: no saved frontiers of %s; the pass starts from the model input",
                 job.name, job.previous[-1].name)
        return None
    try:
        key = (directory / KEY_FILE).read_text() if (directory / KEY_FILE).exists() else ""
        if key != job.chain.upstream:
            raise CorruptCacheError("its key file does not hold the previous layer's key")
        # each file deleted once read, unless caches are kept: the disk then holds the
        # boundary being continued or the one being written, not both whole
        capture = OnePassCapture.resume(model, reference, graph, directory,
                                        consume=False if job.params.runtime.keep_cache
                                        else unlink_in_background,
                                        hold_budget=hold_budget(job))
    except CorruptCacheError:
        raise
    except Exception as err:  # noqa: BLE001 - frontiers are a shortcut: any fault means start over
        raise CorruptCacheError(f"{type(err).__name__}: {err}") from err
    if capture.pending[:1] != [job.name]:  # saved by a plan with other layers in between
        log.info("%s: frontiers %s were saved for layer %s; the pass starts from the model "
                 "input", job.name, directory, capture.pending[:1])
        capture.close()
        return None
    return capture
