"""A unit's captured calls on disk: each call's tensors as shards, its structure beside them.

:func:`write_unit_cache` streams the calls ``(args, kwargs, float output)`` of
:func:`~adaround_core.calibration.unit_capture.iter_unit_calls` into a directory: every
tensor leaf a shard (:func:`~adaround_core.calibration.sample_store.write_shard`, listed in
the manifest under ``in<call>`` / ``out<call>``), the structures with their constants in
``calls.pt`` (tensor leaves there as empty rows of their shape and dtype; a byte shard, so the
manifest's checksum covers it too). The manifest is written last, so a directory with one is
complete. :func:`cached_unit_samples` reads it back
as the samples :func:`~adaround_core.calibration.unit_samples.unit_samples` makes of the same
calls in memory (same groups, rows and draws), each leaf read from disk as it is drawn.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from adaround_core.calibration.layer_samples import LayerSamples
from adaround_core.calibration.sample_store import (
    CorruptCacheError,
    ShardInfo,
    ShardStore,
    read_manifest,
    write_manifest,
    write_shard,
)
from adaround_core.calibration.unit_samples import Call, FlatTree, TreeStore
from adaround_core.torch_private import tree_map

CALLS_FILE = "calls.pt"


def _skeleton(tree: Any) -> Any:
    """``tree`` with each tensor replaced by an empty one of its row shape and dtype."""
    return tree_map(lambda v: v.new_empty((0, *v.shape[1:])) if isinstance(v, torch.Tensor)
                    else v, tree)


def _write_leaves(directory: Path, prefix: str, tree: Any) -> list[ShardInfo]:
    tensors = [v for v in FlatTree(tree).leaves if isinstance(v, torch.Tensor)]
    return [write_shard(directory, f"{prefix}_{k:03d}.bin", t) for k, t in enumerate(tensors)]


def write_unit_cache(directory: Path, calls: Iterable[Call]) -> int:
    """Stream ``calls`` into ``directory`` (existing, empty); returns how many were written."""
    directory = Path(directory)
    groups: dict[str, list[ShardInfo]] = {}
    skeletons = []
    for i, (args, kwargs, output) in enumerate(calls):
        inputs = (tuple(args), dict(kwargs))
        groups[f"in{i:05d}"] = _write_leaves(directory, f"in{i:05d}", inputs)
        groups[f"out{i:05d}"] = _write_leaves(directory, f"out{i:05d}", output)
        skeletons.append((_skeleton(inputs), _skeleton(output)))
    buffer = io.BytesIO()
    torch.save(skeletons, buffer)
    raw = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    groups["calls"] = [write_shard(directory, CALLS_FILE, raw)]
    write_manifest(directory, groups)
    return len(skeletons)


def _store(directory: Path, shards: list[list[ShardInfo]], skeleton: FlatTree,
           device: torch.device | str) -> TreeStore:
    """The rows of one group's members (``shards``: each member's tensor-leaf shards)."""
    is_rows = [isinstance(v, torch.Tensor) for v in skeleton.leaves]
    leaves, k = [], 0
    for value, rows in zip(skeleton.leaves, is_rows, strict=True):
        leaves.append(ShardStore(directory, [member[k] for member in shards], device)
                      if rows else value)
        k += rows
    return TreeStore(leaves, is_rows, skeleton.spec)


def cached_unit_samples(directory: Path, holdout_fraction: float, generator: torch.Generator,
                        device: torch.device | str = "cpu") -> LayerSamples:
    """The samples of a cache written by :func:`write_unit_cache`."""
    directory = Path(directory)
    manifest = read_manifest(directory, verify=False)
    try:
        skeletons = torch.load(io.BytesIO((directory / CALLS_FILE).read_bytes()),
                               weights_only=True)
    except Exception as err:  # any unreadable structure file means the cache is not usable
        raise CorruptCacheError(f"{directory / CALLS_FILE} is unreadable: {err}") from err
    if not skeletons:
        raise ValueError(f"no calls were cached in {directory}")
    grouped: dict[tuple, list[int]] = {}
    flat = [(FlatTree(inputs), FlatTree(output)) for inputs, output in skeletons]
    for i, (inputs, output) in enumerate(flat):
        grouped.setdefault((inputs.key(), output.key()), []).append(i)
    groups = [(_store(directory, [manifest[f"in{i:05d}"] for i in members], flat[members[0]][0],
                      device),
               _store(directory, [manifest[f"out{i:05d}"] for i in members],
                      flat[members[0]][1], device))
              for members in grouped.values()]
    return LayerSamples(groups, holdout_fraction, generator, manifest["in00000"][0].rows)
