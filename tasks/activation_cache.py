"""Activation caching: a layer's quantized-model inputs and float outputs, as shards on disk."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from adaround_core.fake_quantize import FakeQuantState
from adaround_core.layer_capture import iter_layer_io
from adaround_core.model_modes import fake_quant_state
from adaround_core.sample_store import CorruptCacheError, read_manifest, write_layer_cache
from tasks.artifacts import Artifact
from tasks.layer_jobs import LayerJob

_DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
                errno.EACCES: "permission denied", errno.EDQUOT: "the disk quota is exceeded"}


def _valid_cache(directory: Path) -> bool:
    """Whether ``directory`` holds a complete cache whose shards match their checksums."""
    if not directory.exists():
        return False
    try:
        read_manifest(directory, verify=True)
        return True
    except CorruptCacheError as err:
        get_run_logger().warning("activation cache %s is corrupt (%s): recomputing", directory, err)
        shutil.rmtree(directory, ignore_errors=True)
        return False


def _write_cache(job: LayerJob, directory: Path) -> int:
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        model, reference = job.build_models()
        with fake_quant_state(model, FakeQuantState.VALIDATION):
            rows = write_layer_cache(tmp, iter_layer_io(model, reference, job.name, job.calls,
                                                        job.batches()))
        os.replace(tmp, directory)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = _DISK_ERRORS.get(err.errno, err.strerror or str(err))
        raise OSError(err.errno, f"cannot write the activation cache under "
                                 f"{directory.parent}: {reason}; free space or point "
                                 f"runtime.cache_dir elsewhere") from err
    return rows


@task(retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def cache_layer_activations(job: LayerJob) -> Artifact:
    """Make sure the layer's activation cache exists and is intact; return its directory."""
    directory = job.cache_dir()
    if _valid_cache(directory):
        get_run_logger().info("%s: activation cache reused (%s)", job.name, directory)
    else:
        rows = _write_cache(job, directory)
        get_run_logger().info("%s: cached %d samples in %s", job.name, rows, directory)
    return Artifact(str(directory), job.cache_key)
