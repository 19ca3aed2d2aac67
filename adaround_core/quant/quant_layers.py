"""Quantized drop-in layers: the float layer's own class, plus two fake quantizers.

``prepare_qat_fx`` turns an ``nn.Conv2d`` into a :class:`QuantConv2d` *in place*
(class swap), so the qualified name, ``weight``, ``bias``, hooks and every
``isinstance`` check keep working. Each quantized layer fake-quantizes its input
(``input_fake_quant``) and its weight (``weight_fake_quant``, per output channel).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from adaround_core.quant.fake_quantize import FakeQuantize
from adaround_core.quant.observers import ACTIVATION_OBSERVERS, WEIGHT_OBSERVERS
from adaround_core.quant.qconfig import QConfig
from adaround_core.quant.quant_math import symmetric_qrange, unsigned_qrange
from adaround_core.torch_private import (
    conv_forward,
    conv_transpose_output_padding,
    convolution_weight_grad,
)


class QuantLayerMixin:
    """Shared behaviour of quantized Conv/Linear layers.

    Subclasses define ``forward_with_weight(x, weight)`` (the float op with a given
    weight and the layer's bias), ``weight_axis`` (output-channel axis of the weight)
    and ``output_channel_dim`` (channel dimension of the output). They may override
    ``weight_vjp`` with a direct weight-gradient kernel.
    """

    weight_axis = 0
    output_channel_dim = 1

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x = self.input_fake_quant(x)
        return self.forward_with_weight(x, self.weight_fake_quant(self.weight), *args, **kwargs)

    def weight_vjp(self, x: torch.Tensor, weight: torch.Tensor,
                   ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """``forward_with_weight(x, weight)`` and the map ``dL/doutput -> dL/dweight``
        (neither ``x`` nor the bias is differentiated). The output is the caller's: it may
        be overwritten, e.g. by the gradient of the loss (a 224-px layer's output is
        ~100 MB, a fresh tensor for that gradient one more pass over memory).

        Generic version: autograd through ``forward_with_weight``. The gradient is taken
        of the scalar ``sum(output * dL/doutput)``, whose gradient is the same, because
        handing autograd a non-scalar gradient imports sympy on first use (0.5 s). The
        output returned is a copy: the graph may need its own."""
        leaf = weight.detach().requires_grad_(True)
        with torch.enable_grad():
            output = self.forward_with_weight(x, leaf)

        def backward(grad_output: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                (grad,) = torch.autograd.grad((output * grad_output).sum(), leaf)
            return grad

        return output.detach().clone(), backward

    def attach_fake_quants(self, qconfig: QConfig) -> None:
        """Add ``input_fake_quant`` and ``weight_fake_quant`` for ``qconfig``."""
        qmin, qmax = symmetric_qrange(qconfig.weight_bits)
        observer = WEIGHT_OBSERVERS[qconfig.weight_observer](axis=self.weight_axis)
        channels = self.weight.shape[self.weight_axis]
        weight_fq = FakeQuantize(observer, qmin, qmax, channels, axis=self.weight_axis)
        self.weight_fake_quant = weight_fq.to(self.weight.device)
        self.input_fake_quant = _activation_fake_quant(qconfig).to(self.weight.device)

    def weight_qparams(self) -> tuple[torch.Tensor, int, int]:
        """Per-channel weight scale shaped to broadcast against the weight, and the range."""
        fq = self.weight_fake_quant
        shape = [1] * self.weight.dim()
        shape[self.weight_axis] = -1
        return fq.scale.reshape(shape), fq.qmin, fq.qmax

    def freeze_weight_qparams(self) -> None:
        """Compute the weight scale from the current weight (unless frozen), then freeze it."""
        fq = self.weight_fake_quant
        if not bool(fq.frozen):
            fq.observer.observe(self.weight)
            fq.pending = True
            fq.update_qparams()
            fq.freeze()


def _activation_fake_quant(qconfig: QConfig) -> nn.Module:
    if qconfig.activation_bits is None:
        return nn.Identity()
    qmin, qmax = unsigned_qrange(qconfig.activation_bits)
    kind = qconfig.activation_observer
    observer = ACTIVATION_OBSERVERS[kind](qconfig.percentile) if kind == "percentile" \
        else ACTIVATION_OBSERVERS[kind]()
    return FakeQuantize(observer, qmin, qmax)


class QuantLinear(QuantLayerMixin, nn.Linear):
    output_channel_dim = -1

    def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.bias)

    def weight_vjp(self, x: torch.Tensor, weight: torch.Tensor,
                   ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """Direct kernel: ``dL/dW = dY^T X`` over all leading dimensions (one GEMM)."""
        with torch.no_grad():
            output = F.linear(x, weight, self.bias)

        def backward(grad_output: torch.Tensor) -> torch.Tensor:
            return grad_output.reshape(-1, grad_output.shape[-1]).t().mm(
                x.reshape(-1, x.shape[-1]))

        return output, backward


def _conv_weight_grad(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, transposed: bool,
                      output_padding: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``dL/doutput -> dL/dweight`` of a convolution by ATen's own backward kernel, asked
    for the weight gradient only."""

    def backward(grad_output: torch.Tensor) -> torch.Tensor:
        return convolution_weight_grad(layer, x, weight, grad_output, transposed,
                                       output_padding)

    return backward


class _QuantConvNd(QuantLayerMixin):
    def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return conv_forward(self, x, weight)

    def weight_vjp(self, x: torch.Tensor, weight: torch.Tensor,
                   ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """Direct kernel for batched input and zero padding given as numbers (else the
        generic version)."""
        if self.padding_mode != "zeros" or isinstance(self.padding, str) \
                or x.dim() != len(self.stride) + 2:
            return super().weight_vjp(x, weight)
        with torch.no_grad():
            output = conv_forward(self, x, weight)
        return output, _conv_weight_grad(self, x, weight, False, [0] * len(self.stride))


class QuantConv1d(_QuantConvNd, nn.Conv1d):
    pass


class QuantConv2d(_QuantConvNd, nn.Conv2d):
    pass


class QuantConv3d(_QuantConvNd, nn.Conv3d):
    pass


class _QuantConvTransposeNd(QuantLayerMixin):
    weight_axis = 1  # ConvTranspose weights are (in, out / groups, *kernel)
    _functional = None
    _spatial_dims = 0

    def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor,
                            output_size: list[int] | None = None) -> torch.Tensor:
        output_padding = conv_transpose_output_padding(self, x, output_size, self._spatial_dims)
        return type(self)._functional(x, weight, self.bias, self.stride, self.padding,
                                      output_padding, self.groups, self.dilation)

    def weight_vjp(self, x: torch.Tensor, weight: torch.Tensor,
                   ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """Direct kernel (transposed convolution, default output size, batched input)."""
        if x.dim() != len(self.stride) + 2:
            return super().weight_vjp(x, weight)
        output_padding = conv_transpose_output_padding(self, x, None, self._spatial_dims)
        with torch.no_grad():
            output = type(self)._functional(x, weight, self.bias, self.stride, self.padding,
                                            output_padding, self.groups, self.dilation)
        return output, _conv_weight_grad(self, x, weight, True, list(output_padding))


class QuantConvTranspose1d(_QuantConvTransposeNd, nn.ConvTranspose1d):
    _functional, _spatial_dims = F.conv_transpose1d, 1


class QuantConvTranspose2d(_QuantConvTransposeNd, nn.ConvTranspose2d):
    _functional, _spatial_dims = F.conv_transpose2d, 2


class QuantConvTranspose3d(_QuantConvTransposeNd, nn.ConvTranspose3d):
    _functional, _spatial_dims = F.conv_transpose3d, 3


class _IdentityProjection(nn.Module):
    """Stand-in for ``out_proj`` while ``nn.MultiheadAttention`` computes attention."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias


class QuantMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose ``out_proj`` runs as a module.

    The stock module reads ``out_proj.weight`` directly, so a quantized ``out_proj``
    would never be called. Here attention runs with an identity projection and the
    real (quantized) ``out_proj`` is applied to its result: same math, one module call.
    """

    def forward(self, query, key, value, *args, **kwargs):
        with self._identity_out_proj():
            attn_output, attn_weights = nn.MultiheadAttention.forward(
                self, query, key, value, *args, **kwargs)
        return self.out_proj(attn_output), attn_weights

    @contextlib.contextmanager
    def _identity_out_proj(self) -> Iterator[None]:
        real = self._modules["out_proj"]
        w = real.weight
        eye = torch.eye(w.shape[0], w.shape[1], dtype=w.dtype, device=w.device)
        bias = None if real.bias is None else torch.zeros_like(real.bias)
        self._modules["out_proj"] = _IdentityProjection(eye, bias)
        try:
            yield
        finally:
            self._modules["out_proj"] = real


QUANT_LAYER_TYPES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QuantLinear,
    nn.modules.linear.NonDynamicallyQuantizableLinear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.ConvTranspose1d: QuantConvTranspose1d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.ConvTranspose3d: QuantConvTranspose3d,
}


def quant_layers(model: nn.Module) -> dict[str, QuantLayerMixin]:
    """Every quantized Conv/Linear of ``model`` by qualified name (shared modules once)."""
    found: dict[str, QuantLayerMixin] = {}
    for name, module in model.named_modules():  # named_modules() skips repeated instances
        if isinstance(module, QuantLayerMixin):
            found[name] = module
    return found
