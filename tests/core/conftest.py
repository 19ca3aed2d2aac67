"""Fixtures of the engine tests (shared models and helpers live in ``tests/conftest.py``)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Fixed seed per test; one intra-op thread (tiny tensors run many times faster on the
    2-core CI machine, see BENCHMARKS.md, "Thread setting"); the thread setting is restored afterwards."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
