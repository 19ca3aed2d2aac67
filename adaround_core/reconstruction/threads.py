"""The torch intra-op thread setting used while AdaRound runs.

On CPU the thread count follows each layer's work (:func:`layer_threads`): one thread
where a step is small (tiny ops run faster single-threaded, and two threads suffer
badly under background load), all available cores where a step is big enough for
the GEMMs to scale. On a shared machine, start the process with
``OMP_WAIT_POLICY=PASSIVE``: with OpenMP's default spin-waiting, threads whose peer is
descheduled waste their time slices and several threads run slower than one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from adaround_core.reconstruction.step_flops import GEMMS_PER_STEP

# Setup and everything outside a layer's own optimisation run with this on CPU: the
# per-step tensors of the small models it was measured on ran about 5x faster with one
# thread than with two on a 2-core machine (bench/bench_digits.py, "Thread setting" in
# BENCHMARKS.md).
DEFAULT_CPU_THREADS = 1
# A layer whose AdaRound step (forward + weight gradient on one batch, ``step_flops``)
# reaches this many FLOPs runs with all available cores, a smaller one with
# DEFAULT_CPU_THREADS. Measured by bench/bench_threads.py on the shared 2-core EPYC with
# OMP_WAIT_POLICY=PASSIVE ("Thread choice per layer" in BENCHMARKS.md): two threads lost or
# tied up to 38 MFLOP/step and won from 65-134 MFLOP/step on. It must stay above the
# bundled digits model's largest layer (75.5 MFLOP/step at batch 32), which thus keeps its
# single-threaded, bit-identical results.
PARALLEL_MIN_STEP_FLOPS = 100_000_000


def _available_cpu_threads() -> int:
    """Torch's own thread count at import (respects OMP_NUM_THREADS), capped by the CPUs
    this process may run on."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cpus))


AVAILABLE_CPU_THREADS = _available_cpu_threads()


def choose_threads(requested: int | None, device: torch.device) -> int:
    """``requested`` if given, else the default for ``device`` (capture, holdout, setup)."""
    if requested is not None:
        return requested
    if device.type == "cpu":
        return DEFAULT_CPU_THREADS
    return torch.get_num_threads()  # accelerator: host threads matter little


def layer_threads(requested: int | None, device: torch.device, step_flops: int) -> int:
    """Threads for rounding one layer whose step costs ``step_flops``: ``requested`` if
    given; on CPU all available cores from PARALLEL_MIN_STEP_FLOPS on, else one."""
    if requested is not None or device.type != "cpu":
        return choose_threads(requested, device)
    return AVAILABLE_CPU_THREADS if step_flops >= PARALLEL_MIN_STEP_FLOPS else DEFAULT_CPU_THREADS


def capture_threads(requested: int | None, device: torch.device, forward_flops: int) -> int:
    """Threads for capturing the layers' inputs (both models' forward passes over the
    calibration batches) when the largest layer call costs ``forward_flops``: what
    :func:`layer_threads` gives a step of that size (a 224-pixel CNN's convolutions on a
    calibration batch use every core; the digits model's stay on one thread)."""
    return layer_threads(requested, device, GEMMS_PER_STEP * forward_flops)


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
