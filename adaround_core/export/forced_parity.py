"""Teacher-forced parity: the exported graph checked quantization point by quantization point.

End to end, a deep network with 8-bit activations does not let two runtimes agree exactly:
their float32 sums differ in the last bits (other kernels, other summation orders), so a
value lying that close to a rounding boundary lands one activation step apart, and the
next layers carry and amplify the step. This is a property of the model's numerics, not
of the export: the same fake-quant model in PyTorch with another convolution algorithm
disagrees with itself as much (``bench/bench_onnx_parity.py`` measures both).

The check that does tell a wrong graph from float32 rounding feeds every quantization point
of the ONNX graph PyTorch's own integer codes ("teacher forcing") and compares what ONNX
Runtime computes at each point from them with PyTorch's codes:

* every code may differ by at most ``MAX_CODE_STEP`` (1): the value between two quantization
  points is computed from identical integers, so only a sum's last bits can differ, and that
  moves a value across at most one rounding boundary;
* at most ``MAX_FLIP_SHARE`` of a point's codes (and never fewer than ``FLIP_ALLOWANCE``
  codes) may differ at all (a wrong scale, weight, stride or op moves many codes, usually by
  more than one step);
* the model's outputs, computed from the forced codes, may differ by at most
  ``MAX_OUTPUT_DIFF`` of the outputs' range.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from adaround_core.calibration.batches import call_model
from adaround_core.export.onnx_export import input_feed
from adaround_core.quant.fake_quantize import FakeQuantize
from adaround_core.quant.quant_layers import quant_layers
from adaround_core.quant.quant_math import quantize_to_int

SCALE_SUFFIX = ".input_fake_quant.scale"  # a layer's activation QuantizeLinear reads this scale
MAX_CODE_STEP = 1
MAX_FLIP_SHARE = 1e-3
FLIP_ALLOWANCE = 2  # codes a small tensor may flip whatever its size
MAX_OUTPUT_DIFF = 1e-4


@dataclass(frozen=True)
class ForcedPoint:
    """One activation quantization point of the graph: the ``call``-th call of ``layer``."""

    layer: str
    call: int
    forced_input: str  # graph input that replaces the code (fed PyTorch's code)
    code_output: str  # ONNX Runtime's own code, exposed as a graph output

    @property
    def label(self) -> str:
        return self.layer if self.call == 0 else f"{self.layer} (call {self.call + 1})"


@dataclass
class PointParity:
    """How one quantization point's codes compare over the checked samples."""

    label: str
    codes: int = 0
    flips: int = 0
    max_step: int = 0
    first_sample: int | None = None  # first sample with a code beyond MAX_CODE_STEP
    first_flip_sample: int | None = None  # first sample with any differing code

    @property
    def flip_share(self) -> float:
        return self.flips / max(self.codes, 1)

    @property
    def too_many_flips(self) -> bool:
        return self.flips > max(MAX_FLIP_SHARE * self.codes, FLIP_ALLOWANCE)


@dataclass
class ForcedParity:
    """The teacher-forced comparison of one exported model with its PyTorch model."""

    points: list[PointParity]
    output_max_diff: float = 0.0
    worst_output_sample: int | None = None  # the sample with the largest output difference
    output_range: float = 0.0
    samples: int = 0

    @property
    def output_diff_of_range(self) -> float:
        return self.output_max_diff / max(self.output_range, 1e-30)

    @property
    def max_flip_share(self) -> float:
        return max((p.flip_share for p in self.points), default=0.0)

    def summary(self) -> dict[str, float]:
        """The numbers a run records."""
        return {"forced_points": float(len(self.points)),
                "forced_max_code_step": float(max((p.max_step for p in self.points), default=0)),
                "forced_max_flip_share": self.max_flip_share,
                "forced_output_diff_of_range": self.output_diff_of_range}

    def violation(self) -> str | None:
        """A sentence naming the first point (in graph order) beyond the bound, or None."""
        for p in self.points:
            if p.max_step > MAX_CODE_STEP:
                return (f"at the input of layer {p.label!r} ONNX Runtime's activation code "
                        f"differs from PyTorch's by {p.max_step} steps (evaluation sample "
                        f"{p.first_sample}; allowed: {MAX_CODE_STEP})")
            if p.too_many_flips:
                return (f"at the input of layer {p.label!r} {p.flip_share:.2%} of ONNX "
                        f"Runtime's activation codes differ from PyTorch's, the first in "
                        f"evaluation sample {p.first_flip_sample} (allowed: "
                        f"{MAX_FLIP_SHARE:.2%})")
        if self.output_diff_of_range > MAX_OUTPUT_DIFF:
            return (f"the outputs differ by {self.output_diff_of_range:.2e} of their range "
                    f"at evaluation sample {self.worst_output_sample} (allowed: "
                    f"{MAX_OUTPUT_DIFF:.0e}) although every quantization point was fed "
                    f"PyTorch's codes")
        return None


def forced_graph(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[ForcedPoint]]:
    """A copy of ``proto`` in which each activation code (the output of a layer's
    ``QuantizeLinear``, after its ``Clip`` below 8 bits) is read from a new graph input, and
    the code the graph computes is a new graph output."""
    forced = onnx.ModelProto()
    forced.CopyFrom(proto)
    graph = forced.graph
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    calls: Counter[str] = Counter()
    points = []
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or not node.input[1].endswith(SCALE_SUFFIX):
            continue
        layer = node.input[1][: -len(SCALE_SUFFIX)]
        code = _after_clip(node.output[0], consumers)
        point = ForcedPoint(layer, calls[layer], f"forced::{layer}::{calls[layer]}", code)
        calls[layer] += 1
        for consumer in consumers[code]:
            consumer.input[:] = [point.forced_input if i == code else i for i in consumer.input]
        graph.input.append(onnx.helper.make_tensor_value_info(point.forced_input,
                                                              onnx.TensorProto.UINT8, None))
        graph.output.append(onnx.helper.make_tensor_value_info(code, onnx.TensorProto.UINT8,
                                                               None))
        points.append(point)
    return forced, points


def _after_clip(code: str, consumers: dict[str, list[onnx.NodeProto]]) -> str:
    following = consumers[code]
    if len(following) == 1 and following[0].op_type == "Clip":
        return following[0].output[0]
    return code


@contextmanager
def recorded_codes(model: nn.Module) -> Iterator[dict[str, list[np.ndarray]]]:
    """Record, per layer and in call order, the integer code of each quantized layer's input
    while the block runs ``model`` (its fake quantizers in VALIDATION)."""
    codes: dict[str, list[np.ndarray]] = defaultdict(list)

    def recorder(name: str):
        def hook(fq: FakeQuantize, args: tuple) -> None:
            q = quantize_to_int(args[0], fq.scale, fq.zero_point, fq.qmin, fq.qmax)
            codes[name].append(q.detach().cpu().numpy().astype(np.uint8))
        return hook

    handles = [layer.input_fake_quant.register_forward_pre_hook(recorder(name))
               for name, layer in quant_layers(model).items()
               if isinstance(layer.input_fake_quant, FakeQuantize)]
    try:
        yield codes
    finally:
        for handle in handles:
            handle.remove()


def forced_parity(model: nn.Module, proto: onnx.ModelProto,
                  batches: Iterable[Any]) -> ForcedParity:
    """Teacher-forced parity of ``proto`` (exported from ``model``, whose fake quantizers
    are in VALIDATION) on ``batches`` of model inputs (a tensor, a tuple of positional
    tensors or a dict of keyword tensors each, on the model's device). Runs ONNX Runtime's
    reference kernels (no fusion into integer kernels)."""
    import onnxruntime as ort

    graph, points = forced_graph(proto)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(graph.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    model_inputs = [i.name for i in proto.graph.input]
    num_outputs = len(proto.graph.output)
    result = ForcedParity([PointParity(p.label) for p in points])
    for batch in batches:
        with torch.no_grad(), recorded_codes(model) as codes:
            expected = _output_arrays(call_model(model, batch))
        feed = {name: t.detach().cpu().numpy() for name, t in input_feed(batch).items()
                if name in model_inputs}
        feed.update({p.forced_input: codes[p.layer][p.call] for p in points})
        got = session.run(None, feed)
        for point, parity, ort_code in zip(points, result.points, got[num_outputs:], strict=True):
            _compare_codes(parity, codes[point.layer][point.call], ort_code, result.samples)
        _compare_outputs(result, expected, got[:num_outputs])
        result.samples += len(expected[0]) if expected else 0
    return result


def _output_arrays(output: Any) -> list[np.ndarray]:
    from adaround_core.torch_private import tree_leaves

    return [t.detach().float().cpu().numpy() for t in tree_leaves(output)
            if isinstance(t, torch.Tensor)]


def _compare_codes(parity: PointParity, expected: np.ndarray, got: np.ndarray,
                   first_sample: int) -> None:
    step = np.abs(expected.astype(np.int16) - got.astype(np.int16))
    parity.codes += step.size
    parity.flips += int((step > 0).sum())
    parity.max_step = max(parity.max_step, int(step.max(initial=0)))
    per_sample = step.reshape(len(step), -1).max(1) if step.ndim else step.reshape(1)
    if parity.first_flip_sample is None and per_sample.max(initial=0) > 0:
        parity.first_flip_sample = first_sample + int(np.flatnonzero(per_sample > 0)[0])
    if parity.first_sample is None and per_sample.max(initial=0) > MAX_CODE_STEP:
        parity.first_sample = first_sample + int(np.flatnonzero(per_sample > MAX_CODE_STEP)[0])


def _compare_outputs(result: ForcedParity, expected: list[np.ndarray],
                     got: list[np.ndarray]) -> None:
    for e, g in zip(expected, got, strict=True):
        diff = np.abs(e - g).reshape(len(e), -1).max(1) if e.ndim else np.abs(e - g).reshape(1)
        if diff.size and float(diff.max()) > result.output_max_diff:
            result.output_max_diff = float(diff.max())
            result.worst_output_sample = result.samples + int(diff.argmax())
        result.output_range = max(result.output_range, float(e.max(initial=0) - e.min(initial=0)))
