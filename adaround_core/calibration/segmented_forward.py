"""Run a :class:`~adaround_core.calibration.graph_trace.LayerGraph` segment by segment.

A :class:`Frontier` is one batch's forward pass paused before node ``position``: the
values computed so far that a later node still reads (skip connections and non-tensor
values included), by node name. :func:`advance` continues it on a model's own modules,
node by node, with the same calls in the same order as the eager forward pass, so the
values are bit-identical to it. The same graph runs on the quantized model and on its
float copy (same qualified names).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from adaround_core.calibration.checksum import distinct_storages
from adaround_core.calibration.cpu_kernels import (
    call_module,
    faster_function,
    listed,
    plain_torch_module,
)
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


def advance_without_writes(graph: LayerGraph, model: nn.Module, frontier: Frontier,
                           stop: int) -> Frontier:
    """:func:`advance` towards ``stop`` through nodes that write into no existing tensor:
    ``torch.nn`` modules without hooks (an in-place activation run with ``inplace`` off:
    the same values in a new tensor) and the known out-of-place functions and methods of
    :func:`writes_nothing`. Stops before the first other node. The values already in the
    frontier (e.g. a target just taken from it) are thus left as they are."""
    with torch.no_grad():
        while frontier.position < stop and writes_nothing(graph.nodes[frontier.position], model):
            node = graph.nodes[frontier.position]
            module = model.get_submodule(node.target) if node.op == "call_module" else None
            with _inplace_off(module):
                step(graph, model, frontier)
    return frontier


# Functions and tensor methods that return new tensors or views and write into none.
_OUT_OF_PLACE_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    operator.getitem, getattr, torch.add, torch.sub, torch.mul, torch.cat, torch.stack,
    torch.flatten, torch.reshape, torch.matmul, torch.bmm, torch.relu, torch.sigmoid,
    torch.tanh, F.gelu, F.softmax, F.layer_norm, F.adaptive_avg_pool2d, F.avg_pool2d,
    F.max_pool2d, F.pad})
_OUT_OF_PLACE_METHODS = frozenset({
    "view", "reshape", "permute", "transpose", "contiguous", "flatten", "size", "dim",
    "unsqueeze", "squeeze", "expand", "mean", "sum", "softmax", "matmul", "add", "sub",
    "mul", "div", "chunk", "split", "t"})


def writes_nothing(node: fx.Node, model: nn.Module) -> bool:
    """Whether running ``node`` (with :func:`_inplace_off` for a module) writes into no
    tensor that exists before it: a ``torch.nn`` module without hooks, a get_attr, or a
    listed out-of-place function or method (none given ``inplace``)."""
    if node.op == "get_attr":
        return True
    if node.kwargs.get("inplace"):
        return False
    if node.op == "call_module":
        return plain_torch_module(model.get_submodule(node.target))
    if node.op == "call_function":
        return listed(node.target, _OUT_OF_PLACE_FUNCTIONS)
    if node.op == "call_method":
        return node.target in _OUT_OF_PLACE_METHODS
    return False


@contextlib.contextmanager
def _inplace_off(module: nn.Module | None) -> Iterator[None]:
    """``module.inplace`` set to False for the block (torch.nn's in-place activations)."""
    if module is None or not getattr(module, "inplace", False):
        yield
        return
    module.inplace = False
    try:
        yield
    finally:
        module.inplace = True


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
