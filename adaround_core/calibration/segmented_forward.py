"""Run a :class:`~adaround_core.calibration.graph_trace.LayerGraph` segment by segment.

A :class:`Frontier` is one batch's forward pass paused before node ``position``: the
values computed so far that a later node still reads (skip connections and non-tensor
values included), by node name. :func:`advance` continues it on a model's own modules,
node by node, with the same calls in the same order as the eager forward pass, so the
values are bit-identical to it. The same graph runs on the quantized model and on its
float copy (same qualified names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from adaround_core.calibration.checksum import distinct_storages
from adaround_core.calibration.cpu_kernels import call_module, faster_function
from adaround_core.calibration.graph_trace import LayerGraph, batch_arguments
from adaround_core.torch_private import tree_leaves


@dataclass
class Frontier:
    """One batch's live values (by node name) before node ``position`` of the graph."""

    position: int
    values: dict[str, Any]

    def nbytes(self) -> int:
        """Bytes of the tensor storages it holds (shared storages counted once)."""
        return sum(t.untyped_storage().nbytes() for t in distinct_storages(self.values))


def start(graph: LayerGraph, batch: Any, index: int = 0) -> Frontier:
    """The frontier of ``batch`` before the first node after the placeholders."""
    args, kwargs = batch_arguments(batch)
    names = list(graph.arguments)
    given = dict(zip(names, args, strict=False)) | kwargs
    if set(given) != set(names):
        raise ValueError(f"batch {index} passes the arguments {sorted(given)} but the first "
                         f"batch passed {sorted(names)}; give every batch the same arguments")
    values: dict[str, Any] = {}
    position = 0
    for node in graph.nodes:
        if node.op != "placeholder":
            break
        value = given[node.target] if node.target in given else \
            (node.args[0] if node.args else None)
        if node.users:
            values[node.name] = value
        position += 1
    return Frontier(position, values)


def advance(graph: LayerGraph, model: nn.Module, frontier: Frontier, stop: int) -> Frontier:
    """Run nodes ``frontier.position`` up to (not including) ``stop`` on ``model``."""
    with torch.no_grad():
        while frontier.position < stop:
            step(graph, model, frontier)
    return frontier


def step(graph: LayerGraph, model: nn.Module, frontier: Frontier) -> Any:
    """Run the node at ``frontier.position`` on ``model``; return its value."""
    i = frontier.position
    node = graph.nodes[i]
    if node.op == "output":
        raise RuntimeError("the forward pass has already ended")
    with torch.no_grad():
        value = _run_node(node, model, frontier.values, graph.constants)
    if node.users:
        frontier.values[node.name] = value
    for name in graph.free_after[i]:
        del frontier.values[name]
    frontier.position = i + 1
    return value


def node_arguments(node: fx.Node, values: dict[str, Any]) -> tuple[tuple, dict]:
    """The node's positional and keyword arguments, looked up in ``values``."""
    args = fx.node.map_arg(node.args, lambda n: values[n.name])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n.name])
    return args, kwargs


def call_arguments(node: fx.Node, values: dict[str, Any]) -> tuple[tuple, dict]:
    """:func:`node_arguments` in the containers eager code passes (tuples, lists, dicts,
    not fx's immutable ones)."""
    args, kwargs = node_arguments(node, values)
    return _mutable(args), _mutable(kwargs)


def _mutable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _mutable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mutable(v) for v in value]
    if type(value) is tuple:
        return tuple(_mutable(v) for v in value)
    return value


def _run_node(node: fx.Node, model: nn.Module, values: dict[str, Any],
              constants: dict[str, Any]) -> Any:
    args, kwargs = node_arguments(node, values)
    if node.op == "call_module":
        return call_module(model.get_submodule(node.target), *args, **kwargs)
    if node.op == "call_function":
        return faster_function(node.target)(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "get_attr":
        return constants[node.target] if node.target in constants else \
            _attribute(model, node.target)
    raise RuntimeError(f"cannot run graph node {node.name!r} ({node.op})")


def _attribute(model: nn.Module, qualified_name: str) -> Any:
    owner, _, attr = qualified_name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def run_to_end(graph: LayerGraph, model: nn.Module, batch: Any) -> Any:
    """The graph's output on ``batch``, run on ``model``."""
    frontier = start(graph, batch)
    output = graph.nodes[-1]
    advance(graph, model, frontier, len(graph.nodes) - 1)
    return node_arguments(output, frontier.values)[0][0]


def matches_eager(graph: LayerGraph, model: nn.Module, batch: Any, eager_output: Any) -> bool:
    """Whether the graph reproduces ``eager_output`` (model's own output on ``batch``)
    exactly: same structure, bit-identical tensors, equal other values."""
    got = tree_leaves(run_to_end(graph, model, batch))
    want = tree_leaves(eager_output)
    return len(got) == len(want) and all(_identical(a, b) for a, b in zip(got, want, strict=True))


def _identical(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) \
            and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    return bool(a == b)
