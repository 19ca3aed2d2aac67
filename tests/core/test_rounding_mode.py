"""``rounding_mode``: threads, eval mode and VALIDATION for the block, all restored after."""

from __future__ import annotations

import pytest
import torch

from adaround_core.quant.fake_quantize import FakeQuantState, fake_quantizers
from adaround_core.reconstruction.rounding_mode import rounding_mode


def _states(model):
    return [fq.state for fq in fake_quantizers(model)]


@pytest.mark.parametrize("raises", [False, True])
def test_sets_the_mode_and_restores_everything(h, raises):
    _, q, _ = h.calibrated_cnn()
    q.train()
    q.head.eval()  # a submodule with its own flag
    states, threads = _states(q), torch.get_num_threads()
    assert set(states) == {FakeQuantState.CALIBRATION}
    try:
        with rounding_mode(q, num_threads=1) as used:
            assert used == 1 and torch.get_num_threads() == 1
            assert not any(m.training for m in q.modules())
            assert set(_states(q)) == {FakeQuantState.VALIDATION}
            if raises:
                raise RuntimeError("inside")
    except RuntimeError:
        assert raises
    assert _states(q) == states
    assert torch.get_num_threads() == threads
    assert q.training and not q.head.training and q.conv1.training


def test_threads_default_to_the_engine_choice_for_the_device(h):
    from adaround_core.reconstruction.threads import DEFAULT_CPU_THREADS

    _, q, _ = h.calibrated_cnn()
    with rounding_mode(q) as used:
        assert used == DEFAULT_CPU_THREADS == torch.get_num_threads()
