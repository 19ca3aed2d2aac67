"""Faster CPU kernels of the capture's executor: the same values as torch's own."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaround_core.calibration import cpu_kernels
from adaround_core.calibration.cpu_kernels import call_module, faster_function, max_pool2d


def _awkward(dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(2, 5, 13, 11, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[0, 0, 0, 0] = x[1, 2, 5, 5] = float("nan")
    x[0, 3, 3:6, 3:6] = float("-inf")
    x[1, 4, 7, 2] = float("inf")
    return x


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_last_max_pool_is_torch_bit_for_bit(monkeypatch, dtype):
    """Every window shape, stride, padding, dilation and ceil mode: the same values (NaN,
    infinities included) in the same contiguous layout as ``F.max_pool2d``."""
    monkeypatch.setattr(cpu_kernels, "MIN_ELEMENTS", 0)
    x = _awkward(dtype)
    assert cpu_kernels._pools_faster_channels_last(x)
    for k, s, p, d, c in itertools.product([2, 3], [None, 1, 2], [0, 1], [1, 2], [False, True]):
        expected = F.max_pool2d(x, k, s, p, d, c)
        got = max_pool2d(x, k, s, p, d, c)
        assert got.is_contiguous() and _same(got, expected), (k, s, p, d, c)
    values, indices = max_pool2d(x, 3, 2, 1, return_indices=True)  # torch's own path
    assert torch.equal(indices, F.max_pool2d(x, 3, 2, 1, return_indices=True)[1])


def test_small_or_other_inputs_keep_torch_kernel():
    x = _awkward(torch.float32)
    assert not cpu_kernels._pools_faster_channels_last(x)  # below MIN_ELEMENTS
    big = torch.zeros(1, 4, 128, 128)
    assert cpu_kernels._pools_faster_channels_last(big)
    assert not cpu_kernels._pools_faster_channels_last(big.to(torch.int32))
    assert not cpu_kernels._pools_faster_channels_last(big.transpose(2, 3))


def test_the_executor_swaps_in_the_kernel_only_where_it_is_safe(monkeypatch):
    """Functions and plain ``MaxPool2d`` modules get the faster form; a module with a hook
    (which must run) or a subclass (another forward) is called as it is."""
    assert faster_function(F.max_pool2d) is max_pool2d
    assert faster_function(torch.relu) is torch.relu
    fast_calls = []
    monkeypatch.setattr(cpu_kernels, "max_pool2d",
                        lambda *args: fast_calls.append(1) or max_pool2d(*args))
    pool = nn.MaxPool2d(3, 2, 1)
    x = torch.randn(2, 3, 130, 130)
    assert torch.equal(call_module(pool, x), pool(x)) and fast_calls == [1]
    seen = []
    handle = pool.register_forward_hook(lambda *args: seen.append(1))
    assert torch.equal(call_module(pool, x), F.max_pool2d(x, 3, 2, 1))
    assert seen == [1] and fast_calls == [1]
    handle.remove()

    class Custom(nn.MaxPool2d):
        def forward(self, input):
            return super().forward(input) + 1

    assert torch.equal(call_module(Custom(2), x), F.max_pool2d(x, 2) + 1)
    assert fast_calls == [1]
