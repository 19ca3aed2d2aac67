"""The torch intra-op thread setting used while AdaRound runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# On CPU the per-step tensors of AdaRound are small: measured on a 2-core machine,
# one intra-op thread ran small ops about 5x faster than the default (bench/bench_digits.py, "Thread setting" in BENCHMARKS.md).
DEFAULT_CPU_THREADS = 1


def choose_threads(requested: int | None, device: torch.device) -> int:
    """``requested`` if given, else the default for ``device``."""
    if requested is not None:
        return requested
    if device.type == "cpu":
        return DEFAULT_CPU_THREADS
    return torch.get_num_threads()  # accelerator: host threads matter little


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
