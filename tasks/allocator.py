"""glibc's allocator, tuned for a pipeline process's large tensors (Linux with glibc only).

* **Between tasks** (planning, rebuilding models, evaluation) glibc would serve blocks below
  its mmap threshold from its heap and raise that threshold (up to 32 MiB) each time a
  mapped block is freed: a 224-px run's 6-25 MiB activations then stayed in a fragmented
  heap that was never returned, and the process's peak RSS nearly doubled (BENCHMARKS.md,
  "The adaround stage at scale"). :func:`map_large_allocations` fixes the threshold: every
  block of 2 MiB or more is mapped on its own and unmapped when freed.
* **Inside a layer's capture or rounding** the same few sizes (a batch's activations, the
  layer's output, their gradients) are allocated and freed again and again. Mapped afresh,
  each costs its page faults and the kernel's zeroing every time. :func:`heap_reuse` keeps
  freed blocks for the task and gives the memory back at its end: on ResNet-18 at 224 px,
  1024 samples, the capture took 70-77 s instead of 85 s and the rounding 140-158 s instead
  of 172 s (BENCHMARKS.md, "Integer codes for cached inputs, freed memory reused inside a
  layer's tasks"). The heap also grows behind the frontiers a capture holds for the next
  layer: MobileNetV2 at 224 px (512 samples) peaked at 3.85 GB with it, 2.72 GB with it in
  the rounding only (``runtime.reuse_freed_memory: rounding``, as fast there) and 2.34 GB
  without (``none``, 45 % slower).
* **The previous boundary's frontiers**, freed batch by batch as a capture continues them,
  would stay in the reused heap beside the new boundary's: ResNet-18's peak at 1024
  samples rose with each early layer's capture to twice the frontier budget, and that was
  most of MobileNetV2's 3.85 GB (2.63 GB with them given back). The capture
  gives the free memory back (:func:`give_back_free_memory`) after every
  ``tasks.activation_cache.GIVE_BACK_BYTES`` of frontiers it has held, written or consumed
  and of inputs and targets it has handed to the cache writer, which also returns the holes
  freed between held frontiers and the written shards' buffers. (This module
  imports no torch: :mod:`flows.environment` uses it before torch is loaded.)
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from collections.abc import Iterator
from typing import Any

MMAP_THRESHOLD = 2 << 20  # blocks of this size and more are mapped on their own
# mallopt's parameter numbers (malloc.h) and glibc's defaults
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_DEFAULT_TRIM_THRESHOLD = 128 << 10
_DEFAULT_MMAP_MAX = 65536
_NEVER_TRIM = (1 << 31) - 1  # largest value mallopt takes (an int)


def _libc() -> Any | None:
    """The C library when it is glibc on Linux (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (glibc's own functions)
    except (OSError, AttributeError):
        return None
    return libc


def map_large_allocations() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD`; whether it was set (False on
    another C library or system)."""
    libc = _libc()
    return libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


REUSE_SETTINGS = {"all": ("capture", "rounding"), "rounding": ("rounding",), "none": ()}


def reuses_memory(setting: str, task: str) -> bool:
    """Whether ``task`` (``capture`` or ``rounding``) reuses freed memory under
    ``runtime.reuse_freed_memory: setting``."""
    return task in REUSE_SETTINGS[setting]


_reusing = False  # inside a heap_reuse block that tuned the allocator


def give_back_free_memory() -> bool:
    """Inside :func:`heap_reuse`, return the free memory of glibc's heaps to the system now
    (``malloc_trim``; it would stay until the block ends); elsewhere glibc trims by itself
    and nothing is done. Whether any was returned."""
    libc = _libc() if _reusing else None
    return libc is not None and libc.malloc_trim(0) == 1


@contextlib.contextmanager
def heap_reuse(enabled: bool = True) -> Iterator[bool]:
    """For the block, every allocation comes from glibc's heap and freed memory stays
    there for the next one (no block is mapped, the heap is never trimmed); afterwards
    large blocks are mapped again and the heap's free memory goes back to the system
    (``malloc_trim``). Yields whether the allocator could be tuned. For a task that
    allocates and frees the same sizes over and over; not nested (the settings are the
    process's: the inner block's end would restore them). With ``enabled`` False nothing
    changes (``runtime.reuse_freed_memory`` leaves the task out)."""
    libc = _libc() if enabled else None
    if libc is None:
        yield False
        return
    global _reusing
    libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    libc.mallopt(_M_MMAP_MAX, 0)
    _reusing = True
    try:
        yield True
    finally:
        _reusing = False
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
