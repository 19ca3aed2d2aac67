"""The activation caches' disk budget: estimated per layer before any cache is written,
checked against the free space of ``runtime.cache_dir``, reported per layer."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from adaround_core.calibration.sample_store import _row_bytes, read_manifest
from tasks.activation_cache import cache_layer_activations
from tasks.disk_budget import MIB, check_cache_space
from tasks.failures import DiskError, is_disk_error
from tasks.layer_jobs import LayerJob
from tasks.layout import Layout, existing
from tasks.planning import plan_layers


@pytest.fixture(scope="module")
def params(tmp_path_factory, tiny_checkpoints, pipe):
    return pipe.params(pipe.project(tmp_path_factory.mktemp("disk"), tiny_checkpoints))


@pytest.fixture(scope="module")
def inputs(params):
    layout = Layout(params)
    return (existing(layout.dataset, "data"), existing(layout.float_checkpoint, "train"),
            existing(layout.calibrated_checkpoint, "calibrate"))


def _cached_bytes(directory: Path) -> int:
    return sum(shard.rows * _row_bytes(shard) for shards in read_manifest(directory).values()
               for shard in shards)


@pytest.mark.parametrize("layer", ["conv1", "fc1"])
def test_the_estimate_is_what_the_layer_cache_holds(params, inputs, layer):
    plan = plan_layers.fn(params, *inputs)
    assert set(plan.cache_bytes) == set(plan.names)
    # the cache of a later layer needs the earlier results only for its values, not its size
    job = LayerJob(params, *inputs, layer, plan.calls[layer], ())
    cache = cache_layer_activations.fn(job)
    assert plan.cache_bytes[layer] == _cached_bytes(Path(cache.path)) > 0
    # the 8-bit fake-quantized inputs are cached (and counted) as one-byte integer codes
    assert {s.dtype for s in read_manifest(Path(cache.path))["inputs"]} == {"torch.uint8"}


def test_a_layer_larger_than_the_free_disk_stops_the_stage_naming_it(params, tmp_path):
    free = shutil.disk_usage(tmp_path).free
    cache_dir = tmp_path / "not-yet" / "cache"
    tight = params.model_copy(update={"runtime": params.runtime.model_copy(
        update={"cache_dir": str(cache_dir)})})
    with pytest.raises(DiskError) as raised:
        check_cache_space(tight, {"conv1": 1024, "conv2": free + 64 * MIB})
    message = str(raised.value)
    assert message.startswith("layer 'conv2' needs ") and "runtime.cache_dir" in message
    assert str(cache_dir) in message and is_disk_error(raised.value)
    assert not cache_dir.exists()  # nothing was created
    check_cache_space(tight, {"conv1": 1024})  # fits: no error


def test_keep_cache_warns_when_all_caches_will_not_fit(params, tmp_path, caplog):
    free = shutil.disk_usage(tmp_path).free
    keep = params.model_copy(update={"runtime": params.runtime.model_copy(
        update={"cache_dir": str(tmp_path), "keep_cache": True})})
    half = free // 2 + MIB
    with caplog.at_level(logging.WARNING, logger="tasks.disk_budget"):
        check_cache_space(keep, {"conv1": half, "conv2": half})
    assert "all 2 need" in caplog.text and "runtime.keep_cache" in caplog.text
