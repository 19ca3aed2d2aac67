"""The intra-op thread setting used while AdaRound runs."""

from __future__ import annotations

import pytest
import torch

from adaround_core.reconstruction.threads import (
    DEFAULT_CPU_THREADS,
    choose_threads,
    intra_op_threads,
)


def test_choose_threads():
    assert choose_threads(3, torch.device("cpu")) == 3
    assert choose_threads(None, torch.device("cpu")) == DEFAULT_CPU_THREADS == 1
    torch.set_num_threads(2)
    assert choose_threads(None, torch.device("meta")) == 2  # accelerators keep the setting


def test_intra_op_threads_restores_even_on_error():
    torch.set_num_threads(2)
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), intra_op_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
