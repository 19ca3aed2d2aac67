"""Trace a model into a graph whose rounding layers are single, segmentable calls.

:func:`trace_layer_graph` runs ``torch.fx`` symbolic tracing with the rounding layers
(and the caller's ``leaf_types``, e.g. fake quantizers) as opaque leaves, so the graph
calls the very module objects of the model: a weight rounded later is seen by the
graph. It then checks that the graph can be cut right before each layer's call (one
call per layer, in the given order, one positional argument, no other read of the
layer's parameters). Cut points may also be blocks (``blocks``: modules reconstructed as
units, called with any arguments). Anything else raises :class:`NotSegmentable` with the
reason, and the caller falls back to capturing each layer with its own forward pass.
"""

from __future__ import annotations

import hashlib
import inspect
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from adaround_core.torch_private import forward_hooks, global_forward_hooks

SKIPPABLE_HOOK = "adaround_skippable"  # attribute of a hook a traced graph may leave out


class NotSegmentable(Exception):
    """The model cannot be run segment by segment; the message says why."""


def mark_skippable(hook: Callable, when: Callable[[nn.Module], bool] = lambda module: True,
                   ) -> Callable:
    """Mark a forward (pre-)hook as one the traced graph may leave out whenever
    ``when(module)`` is true (it has no effect then). Returns the hook."""
    setattr(hook, SKIPPABLE_HOOK, when)
    return hook


@dataclass(frozen=True)
class LayerGraph:
    """A traced forward pass, cut before each rounding layer's call.

    ``nodes`` run in order; ``layer_calls[name]`` is the index of the layer's call
    node; ``free_after[i]`` names the values no node after ``i`` reads;
    ``constants`` are tensors the trace met outside the module tree;
    ``arguments`` are the forward's parameters a batch supplies.
    """

    nodes: tuple[fx.Node, ...]
    layer_calls: dict[str, int]
    free_after: tuple[tuple[str, ...], ...]
    constants: dict[str, Any]
    arguments: tuple[str, ...]
    fingerprint: str

    def layer_node(self, name: str) -> fx.Node:
        return self.nodes[self.layer_calls[name]]


class _LayerTracer(fx.Tracer):
    """Leaves: the layers, ``leaf_types``, and torch.nn modules holding no layer."""

    def __init__(self, layers: set[nn.Module], leaf_types: tuple[type, ...],
                 holders: set[nn.Module]) -> None:
        super().__init__()
        self._layers, self._leaf_types, self._holders = layers, leaf_types, holders
        self.traced_through: list[nn.Module] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if m in self._layers or isinstance(m, self._leaf_types):
            return True
        if m in self._holders:
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if not self.is_leaf_module(m, ""):
            self.traced_through.append(m)
        return super().call_module(m, forward, args, kwargs)


def trace_layer_graph(model: nn.Module, layers: list[str], leaf_types: tuple[type, ...],
                      batch: Any, blocks: Collection[str] = ()) -> LayerGraph:
    """Trace ``model`` (as called on ``batch``) with ``layers`` as cut points, in that order;
    those also in ``blocks`` are leaves whose calls may take any arguments.

    Raises :class:`NotSegmentable` naming the reason when the graph cannot be cut."""
    _check_global_hooks()
    arguments, concrete = _bind_arguments(model, batch)
    modules = {name: model.get_submodule(name) for name in layers}
    tracer = _LayerTracer(set(modules.values()), leaf_types, _holders(model, layers))
    graph, constants = _trace(tracer, model, concrete)
    for module in [model, *tracer.traced_through]:
        _check_hooks(module)
    nodes = tuple(graph.nodes)
    layer_calls = _layer_calls(nodes, layers, set(blocks))
    _check_no_parameter_reads(nodes, layers)
    return LayerGraph(nodes, layer_calls, _free_after(nodes), constants, arguments,
                      hashlib.sha256(str(graph).encode()).hexdigest())


def _check_global_hooks() -> None:
    if global_forward_hooks():
        raise NotSegmentable("global module forward hooks are registered")


def _check_hooks(module: nn.Module) -> None:
    for hook in forward_hooks(module):
        skippable = getattr(hook, SKIPPABLE_HOOK, None)
        if skippable is None or not skippable(module):
            raise NotSegmentable(f"{type(module).__name__} has a forward hook "
                                 f"({getattr(hook, '__qualname__', hook)!r}) a graph cannot replay")


def _bind_arguments(model: nn.Module, batch: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The forward's parameters ``batch`` supplies, and the defaults of the others
    (traced as constants, so ``if mask is not None`` takes the branch eager takes)."""
    signature = inspect.signature(model.forward)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
        raise NotSegmentable("the model's forward takes *args or **kwargs")
    args, kwargs = batch_arguments(batch)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as error:
        raise NotSegmentable(f"the batch does not fit the model's forward ({error})") from None
    concrete = {name: p.default for name, p in signature.parameters.items()
                if name not in bound.arguments}
    return tuple(bound.arguments), concrete


def batch_arguments(batch: Any) -> tuple[tuple, dict]:
    """Positional and keyword arguments of a processed batch (as ``call_model`` passes them)."""
    if isinstance(batch, dict):
        return (), batch
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def _holders(model: nn.Module, layers: list[str]) -> set[nn.Module]:
    """Every module that contains one of ``layers`` (the root included)."""
    holders = {model}
    for name in layers:
        parts = name.split(".")
        holders.update(model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts)))
    return holders


def _trace(tracer: _LayerTracer, model: nn.Module, concrete: dict[str, Any],
           ) -> tuple[fx.Graph, dict[str, Any]]:
    """The graph, and the constants the tracer stowed on the model (taken back off it)."""
    before = set(vars(model))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as error:  # noqa: BLE001 - any failure of tracing means "cannot segment"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise NotSegmentable(f"torch.fx cannot trace the model "
                             f"({type(error).__name__}: {first_line[:200]})") from None
    finally:
        added = set(vars(model)) - before
        constants = {name: vars(model)[name] for name in added}
        for name in added:
            delattr(model, name)
    return graph, constants


def _layer_calls(nodes: tuple[fx.Node, ...], layers: list[str], blocks: set[str],
                 ) -> dict[str, int]:
    calls: dict[str, list[int]] = {name: [] for name in layers}
    for i, node in enumerate(nodes):
        if node.op == "call_module" and node.target in calls:
            calls[node.target].append(i)
    for name, found in calls.items():
        if len(found) != 1:
            where = "is not called as a module in the traced graph (it runs inside a module " \
                    "tracing treats as opaque)" if not found else f"is called {len(found)} times"
            raise NotSegmentable(f"layer {name!r} {where}")
        node = nodes[found[0]]
        if name not in blocks and (len(node.args) != 1 or node.kwargs):
            raise NotSegmentable(f"layer {name!r} is called with extra arguments")
    order = sorted(layers, key=lambda n: calls[n][0])
    if order != list(layers):
        raise NotSegmentable("the traced graph calls the layers in another order than the "
                             "eager forward pass")
    return {name: found[0] for name, found in calls.items()}


def _check_no_parameter_reads(nodes: tuple[fx.Node, ...], layers: list[str]) -> None:
    """A node reading a layer's weight directly would not see it rounded in time."""
    for node in nodes:
        if node.op == "get_attr":
            for name in layers:
                if str(node.target).startswith(name + "."):
                    raise NotSegmentable(f"the forward reads {node.target!r} directly, "
                                         f"outside the call of layer {name!r}")


def _free_after(nodes: tuple[fx.Node, ...]) -> tuple[tuple[str, ...], ...]:
    """For each node index, the values whose last reader is that node."""
    index = {node: i for i, node in enumerate(nodes)}
    last: dict[int, list[str]] = {}
    for node in nodes:
        if node.users:
            last.setdefault(max(index[u] for u in node.users), []).append(node.name)
    return tuple(tuple(last.get(i, ())) for i in range(len(nodes)))
