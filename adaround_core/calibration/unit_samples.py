"""A unit's cached calls as samples: call arguments of any structure, outputs of any structure.

A reconstruction unit (a block, or a layer whose activation quantizer is trained) is called
with positional and keyword arguments (a BERT layer: hidden states and attention mask) and
may return several tensors. Each call's arguments ``(args, kwargs)`` and float output are
flattened into leaves: tensors are rows along dim 0 (the batch, which all of a call's tensors
must share), other values stay as they are. Calls of the same structure and row shapes form
one group, stored leaf by leaf in :class:`~adaround_core.calibration.sample_store.RowStore`\\ s
(memory here; any store with ``gather`` works, e.g. a disk cache), and
:class:`~adaround_core.calibration.layer_samples.LayerSamples` draws and holds out rows of
these groups exactly as it does for a single layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from adaround_core.calibration.layer_samples import LayerSamples
from adaround_core.calibration.sample_store import RowStore, TensorStore, cached_groups
from adaround_core.torch_private import tree_flatten, tree_unflatten

Call = tuple[tuple, dict, Any]  # (args, kwargs, float output) of one call of the unit


class TreeStore:
    """Rows of a structure of tensors: each tensor leaf a row store, the others constants."""

    def __init__(self, leaves: Sequence[RowStore | Any], is_rows: Sequence[bool], spec: Any) -> None:
        self.leaves, self.is_rows, self.spec = list(leaves), list(is_rows), spec
        stores = [leaf for leaf, rows in zip(leaves, is_rows, strict=True) if rows]
        self.num_rows = stores[0].num_rows
        self.row_shape = stores[0].row_shape
        self.row_nbytes = sum(store.row_nbytes for store in stores)

    def gather(self, index: torch.Tensor) -> Any:
        values = [leaf.gather(index) if rows else leaf
                  for leaf, rows in zip(self.leaves, self.is_rows, strict=True)]
        return tree_unflatten(values, self.spec)

    def advise(self, index: torch.Tensor) -> None:
        for leaf, rows in zip(self.leaves, self.is_rows, strict=True):
            if rows:
                leaf.advise(index)


def unit_samples(unit: str, calls: Sequence[Call], holdout_fraction: float,
                 generator: torch.Generator) -> LayerSamples:
    """Samples of ``unit`` from its calls: inputs ``(args, kwargs)``, targets the outputs."""
    if not calls:
        raise ValueError(f"no samples were captured for unit {unit!r}")
    grouped: dict[tuple, list[tuple[FlatTree, FlatTree]]] = {}
    default_batch = None
    for args, kwargs, output in calls:
        inputs, outputs = FlatTree((tuple(args), dict(kwargs))), FlatTree(output)
        batch = _check_rows(unit, inputs.leaves + outputs.leaves)
        key = (inputs.key(), outputs.key())
        grouped.setdefault(key, []).append((inputs, outputs))
        default_batch = batch if default_batch is None else default_batch
    groups = [(_stack([i for i, _ in members]), _stack([o for _, o in members]))
              for members in grouped.values()]
    return LayerSamples(groups, holdout_fraction, generator, default_batch)


def cached_layer_unit_samples(directory: Path, holdout_fraction: float,
                              generator: torch.Generator,
                              device: torch.device | str = "cpu") -> LayerSamples:
    """A layer's disk cache (:func:`~adaround_core.calibration.sample_store.write_layer_cache`)
    as the samples :func:`unit_samples` makes of its calls ``((x,), {}, y)``: the same groups,
    rows and draws, read from disk as they are drawn."""
    groups = cached_groups(Path(directory), device)
    _, call_spec = tree_flatten(((torch.empty(0),), {}))
    _, output_spec = tree_flatten(torch.empty(0))
    stores = [(TreeStore([x], [True], call_spec), TreeStore([y], [True], output_spec))
              for x, y in groups]
    return LayerSamples(stores, holdout_fraction, generator, groups[0][0].shards[0].rows)


class FlatTree:
    """One structure flattened: its leaves and the spec to rebuild it."""

    def __init__(self, tree: Any) -> None:
        self.leaves, self.spec = tree_flatten(tree)

    def key(self) -> tuple:
        """Equal for structures that can be stacked: same spec, row shapes and constants."""
        parts = tuple(("rows", tuple(v.shape[1:]), v.dtype) if isinstance(v, torch.Tensor)
                      else ("value", repr(v)) for v in self.leaves)
        return str(self.spec), parts


def _check_rows(unit: str, leaves: list) -> int:
    """The batch size every tensor leaf shares (dim 0); an error naming ``unit`` else."""
    tensors = [v for v in leaves if isinstance(v, torch.Tensor)]
    if not tensors:
        raise ValueError(f"unit {unit!r} is called without any tensor argument")
    batch = tensors[0].shape[0] if tensors[0].dim() else None
    for t in tensors:
        if t.dim() == 0 or t.shape[0] != batch:
            raise ValueError(f"unit {unit!r} gets or returns a tensor of shape "
                             f"{tuple(t.shape)} whose dim 0 is not the batch size {batch}; "
                             f"name other blocks in 'blocks' or use granularity: layer")
    return batch


def _stack(members: list[FlatTree]) -> TreeStore:
    """The rows of all members (same key) as one store."""
    first = members[0]
    is_rows = [isinstance(v, torch.Tensor) for v in first.leaves]
    leaves = [TensorStore(torch.cat([m.leaves[k] for m in members])) if rows else value
              for k, (value, rows) in enumerate(zip(first.leaves, is_rows, strict=True))]
    return TreeStore(leaves, is_rows, first.spec)
