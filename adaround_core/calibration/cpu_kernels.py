"""Exact, faster CPU kernels for ops the capture's executor runs on whole batches.

torch's ``max_pool2d`` over a contiguous (NCHW) CPU tensor loops over each plane without
vectorising; on a ResNet's 224-px stem batch (32 x 64 x 112 x 112) it took 114 ms, while
converting to channels-last, pooling there (vectorised over channels) and converting back
took 38 ms. A maximum is exact, so the values are the same bit for bit (NaN and
infinities included); the executor (:mod:`~.segmented_forward`) uses the faster form.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaround_core.torch_private import forward_hooks, global_forward_hooks

# Below this many elements the conversions cost more than the loop saves.
MIN_ELEMENTS = 1 << 16


def max_pool2d(x: torch.Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0,
               dilation: Any = 1, ceil_mode: bool = False,
               return_indices: bool = False) -> Any:
    """``F.max_pool2d`` with the same result, pooled in channels-last memory when that is
    faster (a large contiguous 4-D CPU tensor, no indices asked)."""
    if return_indices or not _pools_faster_channels_last(x):
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode,
                            return_indices)
    pooled = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), kernel_size,
                          stride, padding, dilation, ceil_mode)
    return pooled.contiguous()


def _pools_faster_channels_last(x: Any) -> bool:
    return (isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dim() == 4
            and x.is_floating_point() and x.numel() >= MIN_ELEMENTS and x.is_contiguous())


_FUNCTIONS: dict[Any, Callable[..., Any]] = {F.max_pool2d: max_pool2d,
                                             torch.max_pool2d: max_pool2d}


def listed(target: Any, table: dict | frozenset | set) -> bool:
    """Whether a graph node's ``target`` is a key of ``table`` (an unhashable callable,
    e.g. a bound method of an unhashable object, never is)."""
    try:
        return target in table
    except TypeError:
        return False


def faster_function(target: Any) -> Any:
    """The faster equivalent of a graph's function ``target``, or ``target`` itself."""
    return _FUNCTIONS[target] if listed(target, _FUNCTIONS) else target


def plain_torch_module(module: nn.Module) -> bool:
    """Whether ``module`` is one of torch.nn's own modules (not a subclass defined
    elsewhere) with no forward hooks of its own and none registered globally: its forward
    is torch's, and nothing else runs when it is called."""
    return (type(module).__module__.startswith("torch.nn.modules.")
            and not forward_hooks(module) and not global_forward_hooks())


def call_module(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)``, through a faster equivalent of its forward where there
    is one (never for a module with hooks, whose hooks must run)."""
    if (type(module) is nn.MaxPool2d and len(args) == 1 and not kwargs
            and plain_torch_module(module)):
        return max_pool2d(args[0], module.kernel_size, module.stride, module.padding,
                          module.dilation, module.ceil_mode, module.return_indices)
    return module(*args, **kwargs)
