"""Disk the activation caches need: each layer's cache size, estimated from one forward pass
before any cache is written, and checked against the free space of ``runtime.cache_dir``.

A layer's cache holds its quantized-model inputs and float-model outputs for every
calibration sample (every call of the layer). The sizes are measured on the first batch
and scaled by the number of samples.
"""

from __future__ import annotations

import errno
import logging
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaround_core.calibration.activation_codes import input_codes
from adaround_core.calibration.batches import call_model
from adaround_core.torch_private import tree_leaves
from tasks.failures import DiskError
from tasks.params import PipelineParams

MIB = 2**20
logger = logging.getLogger(__name__)


def _rows(batch: Any) -> int:
    """Samples in a batch: the leading size of its first tensor."""
    return next(t.shape[0] for t in tree_leaves(batch) if isinstance(t, torch.Tensor))


def _nbytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(value)
               if isinstance(t, torch.Tensor))


def layer_cache_bytes(model: nn.Module, names: Sequence[str], batches: Sequence[Any],
                      codes: bool = True) -> dict[str, int]:
    """Bytes of each named layer's activation cache (inputs and outputs of all its calls)
    over all ``batches``, from one forward pass of the first batch; with ``codes`` an input
    the layer's quantizer gives integer codes for counts one byte a value, as cached."""
    first: Counter[str] = Counter()

    def measure(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            encoded = input_codes(module, args[0]) if codes else None
            stored = args[0] if encoded is None else encoded.codes
            first[name] += _nbytes(stored) + _nbytes(output)
        return hook

    handles = [model.get_submodule(n).register_forward_hook(measure(n)) for n in names]
    try:
        with torch.no_grad():
            call_model(model, batches[0])
    finally:
        for handle in handles:
            handle.remove()
    total = getattr(batches, "num_samples", None) or sum(_rows(b) for b in batches)
    scale = total / _rows(batches[0])
    return {name: int(first[name] * scale) for name in names}


def _existing(directory: Path) -> Path:
    """``directory`` or its nearest existing parent (the disk it will be on)."""
    directory = directory.resolve()
    while not directory.exists():
        directory = directory.parent
    return directory


def check_cache_space(params: PipelineParams, cache_bytes: dict[str, int]) -> None:
    """Raise :class:`DiskError` when ``runtime.cache_dir`` cannot hold the largest layer's
    cache; warn when, with ``runtime.keep_cache``, it cannot hold all of them."""
    if not cache_bytes:
        return
    name = max(cache_bytes, key=cache_bytes.__getitem__)
    directory = Path(params.runtime.cache_dir)
    free = shutil.disk_usage(_existing(directory)).free
    if cache_bytes[name] > free:
        raise DiskError(errno.ENOSPC, f"layer {name!r} needs {cache_bytes[name] / MIB:.1f} MiB "
                                      f"of activation cache but {directory} "
                                      f"(runtime.cache_dir) has only {free / MIB:.1f} MiB free: "
                                      f"free space there or point runtime.cache_dir at a "
                                      f"larger disk")
    total = sum(cache_bytes.values())
    if params.runtime.keep_cache and total > free:
        logger.warning("runtime.keep_cache keeps every layer's activation cache: all %d need "
                       "%.1f MiB but %s has %.1f MiB free; the run stops (nothing finished is "
                       "lost) when it fills up", len(cache_bytes), total / MIB, directory,
                       free / MIB)
