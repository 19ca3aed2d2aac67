"""Writes behind the capture: in order, bounded, errors raised in the caller, cancellable."""

from __future__ import annotations

import threading

import pytest
import torch

from adaround_core.calibration.background_writes import BackgroundWrites
from adaround_core.calibration.sample_store import read_manifest, write_layer_cache


def test_results_come_in_submission_order_with_at_most_depth_pending():
    writes = BackgroundWrites(depth=2)
    release = threading.Event()
    running = []

    def job(i):
        running.append(i)
        release.wait(5)
        return i * 10

    writes.submit(job, 0)
    writes.submit(job, 1)
    assert len(writes._pending) == 2
    release.set()
    writes.submit(job, 2)  # waits for job 0 first: never more than two pending
    assert len(writes._pending) == 2
    assert writes.results() == [0, 10, 20] and running == [0, 1, 2]


def test_an_error_of_a_write_is_raised_in_the_caller():
    writes = BackgroundWrites(depth=1)

    def fail():
        raise OSError(28, "No space left on device")

    writes.submit(fail)
    with pytest.raises(OSError, match="No space left"):
        writes.submit(lambda: None)  # the caller learns of it at the next write at latest


def test_cancel_drops_the_writes_not_started():
    writes = BackgroundWrites(depth=3)
    started, release = threading.Event(), threading.Event()
    done = []

    def block():
        started.set()
        release.wait(5)

    writes.submit(block)
    started.wait(5)
    writes.submit(done.append, "late")
    threading.Timer(0.05, release.set).start()
    writes.cancel()  # waits for the running one, drops the queued one
    assert done == [] and writes.results() == []


def test_a_cache_whose_producer_fails_midway_writes_nothing_after(tmp_path):
    def pairs():
        for i in range(3):
            yield torch.full((2, 3), float(i)), torch.full((2, 1), float(i))
        raise RuntimeError("the model failed on batch 3")

    with pytest.raises(RuntimeError, match="batch 3"):
        write_layer_cache(tmp_path, pairs())
    files = set(tmp_path.iterdir())
    assert not (tmp_path / "manifest.json").exists()
    assert not any(".tmp" in f.name for f in files)  # the running write was waited for
    threading.Event().wait(0.05)
    assert set(tmp_path.iterdir()) == files  # and nothing queued lands later
    (tmp_path / "ok").mkdir()
    rows = write_layer_cache(tmp_path / "ok", [(torch.ones(2, 3), torch.ones(2, 1))] * 3)
    assert rows == 6 and len(read_manifest(tmp_path / "ok")["inputs"]) == 3
