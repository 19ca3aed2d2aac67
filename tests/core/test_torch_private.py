"""The private torch API of ``adaround_core.torch_private`` exists in the pinned torch and
computes what its public equivalent computes."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaround_core import torch_private as tp


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("symbol", tp.PRIVATE_SYMBOLS)
def test_private_symbol_exists_in_pinned_torch(symbol):
    assert _resolve(symbol) is not None


def test_no_other_module_uses_private_torch_names():
    import pathlib
    import re

    root = pathlib.Path(tp.__file__).parent
    pattern = re.compile(r"_pytree|_BatchNorm|torch\.ops\.|_fused_adam_|\._conv_forward|"
                         r"\._output_padding")
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name != "torch_private.py" and pattern.search(p.read_text())]
    assert offenders == []


def test_conv_weight_grad_matches_autograd():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, groups=1)
    x, grad_out = torch.randn(2, 3, 9, 9), None
    weight = conv.weight.detach().clone().requires_grad_(True)
    out = F.conv2d(x, weight, conv.bias, conv.stride, conv.padding)
    grad_out = torch.randn_like(out)
    (expected,) = torch.autograd.grad((out * grad_out).sum(), weight)
    got = tp.convolution_weight_grad(conv, x, weight.detach(), grad_out, False, [0, 0])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(tp.conv_forward(conv, x, weight.detach()), out.detach())


def test_conv_transpose_output_padding_matches_forward():
    layer = nn.ConvTranspose1d(2, 2, 3, stride=2)
    x = torch.randn(1, 2, 5)
    padding = tp.conv_transpose_output_padding(layer, x, [12], 1)
    expected = layer(x, output_size=[12])
    got = F.conv_transpose1d(x, layer.weight, layer.bias, layer.stride, layer.padding, padding)
    torch.testing.assert_close(got, expected)


def test_sigmoid_backward_is_the_sigmoid_derivative():
    v, grad = torch.randn(10), torch.randn(10)
    s = torch.sigmoid(v)
    torch.testing.assert_close(tp.sigmoid_backward(grad, s), grad * s * (1 - s))


def test_fused_adam_step_equals_torch_adam():
    torch.manual_seed(0)
    p_fused, grad = torch.randn(5), torch.randn(5)
    p_ref = p_fused.clone().requires_grad_(True)
    assert tp.fused_adam_available(p_fused)
    state = [torch.zeros(5), torch.zeros(5), torch.ones(())]
    tp.fused_adam_step(p_fused, grad, *state, lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    adam = torch.optim.Adam([p_ref], lr=0.01)
    p_ref.grad = grad
    adam.step()
    torch.testing.assert_close(p_fused, p_ref.detach())


def test_batchnorm_base_and_pytree():
    assert isinstance(nn.BatchNorm2d(3), tp.BatchNormBase)
    tree = {"a": torch.ones(1), "b": (torch.zeros(2), 3)}
    assert len(tp.tree_leaves(tree)) == 3
    doubled = tp.tree_map(lambda t: t * 2 if isinstance(t, torch.Tensor) else t, tree)
    assert doubled["a"].item() == 2.0 and doubled["b"][1] == 3


@pytest.mark.parametrize("attribute", tp.PRIVATE_MODULE_ATTRIBUTES)
def test_private_module_attribute_exists(attribute):
    assert hasattr(nn.Linear(1, 1), attribute)


def test_forward_hooks_lists_a_module_own_and_global_hooks():
    layer = nn.Linear(1, 1)
    assert tp.forward_hooks(layer) == []

    def hook(*_):
        return None

    handles = [layer.register_forward_pre_hook(hook), layer.register_forward_hook(hook)]
    assert tp.forward_hooks(layer) == [hook, hook]
    for h in handles:
        h.remove()
    assert tp.global_forward_hooks() == []
    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        assert tp.global_forward_hooks() == [hook]
    finally:
        handle.remove()
