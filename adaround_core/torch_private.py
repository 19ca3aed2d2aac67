"""Every private torch API the engine uses, in one place.

Each is here because the public API has no equivalent or is too slow inside AdaRound's
per-step loop. ``tests/core/test_torch_private.py`` checks that every symbol still exists
in the pinned torch, so a torch upgrade that removes one fails there, by name, instead of
somewhere deep in a run. Nothing else in the package touches an underscore name of torch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

BatchNormBase = _BatchNorm  # common base of BatchNorm1d/2d/3d (and SyncBatchNorm)

__all__ = ["BatchNormBase", "conv_forward", "conv_transpose_output_padding",
           "convolution_weight_grad", "forward_hooks", "fused_adam_available",
           "fused_adam_step", "global_forward_hooks", "sigmoid_backward", "tree_flatten", "tree_leaves",
           "tree_map", "tree_unflatten"]

# The private names behind the functions above, as dotted paths from ``torch``.
PRIVATE_SYMBOLS = (
    "torch.nn.modules.batchnorm._BatchNorm",
    "torch.utils._pytree.tree_leaves",
    "torch.utils._pytree.tree_map",
    "torch.utils._pytree.tree_flatten",
    "torch.utils._pytree.tree_unflatten",
    "torch.nn.Conv1d._conv_forward",
    "torch.nn.Conv2d._conv_forward",
    "torch.nn.Conv3d._conv_forward",
    "torch.nn.ConvTranspose2d._output_padding",
    "torch.ops.aten.convolution_backward",
    "torch.ops.aten.sigmoid_backward",
    "torch._fused_adam_",
    "torch.nn.modules.module._global_forward_pre_hooks",
    "torch.nn.modules.module._global_forward_hooks",
)
# Instance attributes (no dotted path from ``torch``), checked by test_torch_private too.
PRIVATE_MODULE_ATTRIBUTES = ("_forward_pre_hooks", "_forward_hooks")



def conv_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``nn.ConvNd``'s forward with another weight (padding modes included)."""
    return layer._conv_forward(x, weight, layer.bias)

def conv_transpose_output_padding(layer: nn.Module, x: torch.Tensor,
                                  output_size: list[int] | None, spatial_dims: int) -> list[int]:
    """The output padding ``nn.ConvTransposeNd.forward`` would use for ``x``."""
    return layer._output_padding(x, output_size, layer.stride, layer.padding,
                                 layer.kernel_size, spatial_dims, layer.dilation)

def convolution_weight_grad(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                            grad_output: torch.Tensor, transposed: bool,
                            output_padding: list[int]) -> torch.Tensor:
    """``dL/dweight`` of a (transposed) convolution by ATen's backward kernel, asked for
    the weight gradient only."""
    return torch.ops.aten.convolution_backward(
        grad_output, x, weight, None, list(layer.stride), list(layer.padding),
        list(layer.dilation), transposed, output_padding, layer.groups,
        [False, True, False])[1]

def sigmoid_backward(grad: torch.Tensor, sigmoid: torch.Tensor) -> torch.Tensor:
    """``grad * sigmoid * (1 - sigmoid)`` in one kernel."""
    return torch.ops.aten.sigmoid_backward(grad, sigmoid)

def fused_adam_available(param: torch.Tensor) -> bool:
    """Whether :func:`fused_adam_step` supports ``param``'s dtype and device."""
    return (hasattr(torch, "_fused_adam_") and param.dtype in (torch.float32, torch.float64)
            and param.device.type in ("cpu", "cuda"))

def fused_adam_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                    exp_avg_sq: torch.Tensor, step: torch.Tensor, lr: float,
                    betas: tuple[float, float], eps: float) -> None:
    """One Adam update of ``param`` in place: the kernel behind
    ``torch.optim.Adam(fused=True)``, without the optimizer's per-step bookkeeping."""
    torch._fused_adam_([param], [grad], [exp_avg], [exp_avg_sq], [], [step], lr=lr,
                       beta1=betas[0], beta2=betas[1], weight_decay=0.0, eps=eps,
                       amsgrad=False, maximize=False)

def forward_hooks(module: nn.Module) -> list:
    """The forward pre-hooks and forward hooks registered on ``module`` itself."""
    return [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]

def global_forward_hooks() -> list:
    """The forward (pre-)hooks registered for every module
    (``register_module_forward_pre_hook`` / ``register_module_forward_hook``)."""
    return [*_module._global_forward_pre_hooks.values(), *_module._global_forward_hooks.values()]
