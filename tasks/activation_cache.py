"""Activation caching: a layer's quantized-model inputs and float outputs, as shards on disk
(a block's: the arguments of its calls and its float outputs).

With one-pass capture (:mod:`tasks.capture`) the task also leaves the forward passes paused
at its unit's boundary under ``<cache_dir>/frontiers/`` for the next layer's task, which
deletes the ones it continued once its own cache exists (unless ``runtime.keep_cache``).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from adaround_core.calibration.activation_codes import ActivationCodes
from adaround_core.calibration.frontier_store import release_held
from adaround_core.calibration.held_frontiers import HELD_FRONTIERS
from adaround_core.calibration.one_pass_capture import CAPTURE_STATE
from adaround_core.calibration.sample_store import (
    CorruptCacheError,
    read_manifest,
    write_layer_cache,
)
from adaround_core.calibration.unit_store import write_unit_cache
from adaround_core.reconstruction.rounding_mode import rounding_mode
from adaround_core.torch_private import tree_leaves
from tasks.allocator import give_back_free_memory, heap_reuse, reuses_memory
from tasks.artifacts import Artifact
from tasks.cache_removal import remove_in_background, wait_for_removals
from tasks.capture import open_capture
from tasks.failures import disk_problem, pipeline_task
from tasks.guard_batches import training_inputs
from tasks.layer_jobs import LayerJob
from tasks.model_state import layer_models
from tasks.run_logging import run_logger

T = TypeVar("T")
# Bytes a capture allocates or frees (frontiers held, written or consumed; captured inputs
# and targets, freed once written) between two returns of the heap's free memory to the
# system: a reused heap holds about this much at most beside what is alive (the previous
# boundary's freed frontiers, the holes between held ones, written shards' buffers).
GIVE_BACK_BYTES = 256 << 20


def _valid_cache(directory: Path) -> bool:
    """Whether ``directory`` holds a complete cache whose shards match their checksums."""
    if not directory.exists():
        return False
    try:
        read_manifest(directory, verify=True)
        return True
    except CorruptCacheError as err:
        run_logger(__name__).warning("activation cache %s is corrupt (%s): recomputing",
                                     directory, err)
        shutil.rmtree(directory, ignore_errors=True)
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_temporaries(directory: Path) -> None:
    """Temporary cache dirs of this layer left by killed processes (their pid is gone)."""
    for tmp in directory.parent.glob(f".{directory.name}.tmp-*"):
        pid = tmp.name.rpartition("-")[2]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, directory: Path, valid: Callable[[Path], bool] = _valid_cache) -> None:
    """Rename the finished directory into place; if another process published the same
    one first (same key, same content), keep theirs; an invalid one in the way is replaced.
    Whichever is deleted lets go of the frontiers it held in this process's memory."""
    try:
        os.replace(tmp, directory)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if valid(directory):
            release_held(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        release_held(directory)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)


def _temporary(directory: Path) -> Path:
    """A fresh, empty temporary directory of this process next to ``directory``."""
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _remove_dead_temporaries(directory)
    return tmp


def _saved_frontiers(directory: Path) -> bool:
    """Whether ``directory`` holds a finished save (its files are checked when used)."""
    return (directory / CAPTURE_STATE).is_file()


def _capture(job: LayerJob, directory: Path, model: nn.Module, reference: nn.Module,
             temporaries: list[Path]) -> tuple[Path, int, str]:
    """Write the job's cache into a temporary directory beside ``directory`` (models in
    rounding mode); that directory, the number of rows (a block's: of calls) and where
    capture started. Continued frontiers that are unusable, found on opening or midway
    (a checksum), are deleted and the capture starts over from the model input."""
    batches = training_inputs(job.params, job.dataset)
    try:
        return _capture_once(job, directory, model, reference, batches, temporaries)
    except CorruptCacheError as err:
        upstream = job.upstream_frontier_dir()
        if upstream is None or not upstream.exists():
            raise
        run_logger(__name__).warning("%s: frontiers %s are unusable (%s: %s); deleted, the "
                                     "pass starts from the model input", job.name, upstream,
                                     type(err).__name__, err)
        release_held(upstream)
        shutil.rmtree(upstream, ignore_errors=True)
        return _capture_once(job, directory, model, reference, batches, temporaries,
                             upstream=False)


def _capture_once(job: LayerJob, directory: Path, model: nn.Module, reference: nn.Module,
                  batches: list, temporaries: list[Path], upstream: bool = True,
                  ) -> tuple[Path, int, str]:
    """One capture into a fresh temporary directory; with one-pass capture the frontiers
    for the next unit are written alongside, batch by batch, and published at the end."""
    tmp = _temporary(directory)
    temporaries.append(tmp)
    capture = open_capture(job, model, reference, batches, upstream)
    try:
        frontiers = None
        if capture.saves_frontiers:
            frontiers = capture.frontier_sink(_temporary(job.frontier_dir()))
            temporaries.append(frontiers)
        rows = (write_unit_cache(tmp, giving_back_memory(capture.calls(frontiers)))
                if job.block else
                write_layer_cache(tmp, giving_back_memory(capture.pairs(frontiers))))
    finally:
        capture.close()
    if frontiers is not None:
        _publish(frontiers, job.frontier_dir(), _saved_frontiers)
    return tmp, rows, capture.source


def giving_back_memory(items: Iterator[T]) -> Iterator[T]:
    """``items`` of a capture (pairs or calls); after each, once :data:`GIVE_BACK_BYTES`
    moved since the last time (frontiers offered, taken or dropped: ``HELD_FRONTIERS.moved``;
    and the items' own tensors, freed once their shards are written), the heap's free memory
    goes back to the system (:func:`~tasks.allocator.give_back_free_memory`): inside
    :func:`~tasks.allocator.heap_reuse` it would keep the previous boundary's frontiers
    beside the new boundary's, the holes left between held ones, and the written shards'
    buffers (a ResNet stem's targets are 100 MB a batch)."""
    items_moved = 0
    mark = HELD_FRONTIERS.moved
    for item in items:
        items_moved += captured_bytes(item)
        yield item
        if HELD_FRONTIERS.moved + items_moved - mark >= GIVE_BACK_BYTES:
            give_back_free_memory()
            mark = HELD_FRONTIERS.moved + items_moved


def captured_bytes(item: Any) -> int:
    """Bytes of the tensors in a captured pair or call (integer codes as their codes)."""
    return sum(leaf.codes.nbytes if isinstance(leaf, ActivationCodes) else leaf.nbytes
               for leaf in tree_leaves(item)
               if isinstance(leaf, (torch.Tensor, ActivationCodes)))


def _write_cache(job: LayerJob, directory: Path) -> tuple[int, str]:
    """Capture the unit into its cache (and, with one-pass capture, save the paused
    passes for the next layer first); the number of rows and where capture started."""
    temporaries: list[Path] = []
    try:
        model, reference = layer_models(job.params, job.dataset, job.float_model,
                                        job.calibrated, job.previous)
        wait_for_removals()  # the previous layer's cache is off the disk before this one
        threads = job.capture_threads or job.params.adaround.num_threads
        with rounding_mode(model, threads), \
                heap_reuse(reuses_memory(job.params.runtime.reuse_freed_memory, "capture")):
            tmp, rows, source = _capture(job, directory, model, reference, temporaries)
        _publish(tmp, directory)
    except OSError as err:
        for path in temporaries:
            shutil.rmtree(path, ignore_errors=True)
        problem = disk_problem(err, directory.parent, "runtime.cache_dir",
                               "the activation cache")
        if problem is None:
            raise
        raise problem from None
    return rows, source


@pipeline_task(retries=2, retry_delay_seconds=1)
def cache_layer_activations(job: LayerJob) -> Artifact:
    """Make sure the layer's activation cache exists and is intact; return its directory."""
    directory = job.cache_dir()
    if _valid_cache(directory):
        run_logger(__name__).info("%s: activation cache reused (%s)", job.name, directory)
    else:
        rows, source = _write_cache(job, directory)
        run_logger(__name__).info("%s: cached %d samples in %s (capture %s)", job.name, rows,
                                  directory, source)
    return Artifact(str(directory), job.cache_key)


def remove_layer_cache(job: LayerJob) -> None:
    """Delete the layer's activation cache, in the background (its result is written;
    ``runtime.keep_cache`` keeps it for runs that change only AdaRound settings)."""
    remove_in_background(job.cache_dir(), Path(job.params.runtime.cache_dir))


def remove_used_frontiers(job: LayerJob) -> None:
    """Delete the frontiers the job's capture continued from, in the background (its cache
    exists now; no other layer continues them; ``runtime.keep_cache`` keeps them like the
    caches)."""
    directory = job.upstream_frontier_dir()
    if directory is not None:
        release_held(directory)
        remove_in_background(directory, Path(job.params.runtime.cache_dir))
