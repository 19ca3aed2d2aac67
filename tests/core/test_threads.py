"""The intra-op thread setting used while AdaRound runs, and its choice per layer."""

from __future__ import annotations

import pytest
import torch

from adaround_core.reconstruction import threads
from adaround_core.reconstruction.threads import (
    DEFAULT_CPU_THREADS,
    PARALLEL_MIN_STEP_FLOPS,
    choose_threads,
    intra_op_threads,
    layer_threads,
)

CPU = torch.device("cpu")


def test_choose_threads():
    assert choose_threads(3, CPU) == 3
    assert choose_threads(None, CPU) == DEFAULT_CPU_THREADS == 1
    torch.set_num_threads(2)
    assert choose_threads(None, torch.device("meta")) == 2  # accelerators keep the setting


def test_layer_threads_follow_the_work(monkeypatch):
    monkeypatch.setattr(threads, "AVAILABLE_CPU_THREADS", 4)
    assert layer_threads(None, CPU, 100_000) == 1  # a digits-sized layer
    assert layer_threads(None, CPU, PARALLEL_MIN_STEP_FLOPS - 1) == 1
    assert layer_threads(None, CPU, PARALLEL_MIN_STEP_FLOPS) == 4
    assert layer_threads(None, CPU, 14_797_504_512) == 4  # ResNet-18 layer1 at 224, batch 32


def test_explicit_threads_hold_for_every_layer(monkeypatch):
    monkeypatch.setattr(threads, "AVAILABLE_CPU_THREADS", 4)
    assert layer_threads(3, CPU, 1) == 3
    assert layer_threads(1, CPU, 10**12) == 1
    torch.set_num_threads(2)
    assert layer_threads(None, torch.device("meta"), 10**12) == 2  # accelerator: unchanged


def test_available_threads_are_at_least_one_and_at_most_the_cpus():
    import os

    assert 1 <= threads.AVAILABLE_CPU_THREADS <= (os.cpu_count() or 1)


def test_intra_op_threads_restores_even_on_error():
    torch.set_num_threads(2)
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), intra_op_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
