"""BatchNorm folding: which pairs fold, and the folded layer equals Conv/Linear + BN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adaround_core.quant.bn_folding import find_foldable_pairs, fold_batchnorms, fold_into_layer


def _bn(n: int, dims: int = 2, seed: int = 0) -> nn.Module:
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    bn = cls(n)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(n, generator=g))
    return bn.eval()


def test_fold_into_linear_hand_formula():
    layer = nn.Linear(2, 2)
    bn = nn.BatchNorm1d(2, eps=0.0).eval()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        layer.bias.copy_(torch.tensor([0.5, -1.0]))
        bn.running_mean.copy_(torch.tensor([1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25]))  # std 2 and 0.5
        bn.weight.copy_(torch.tensor([2.0, 1.0]))
        bn.bias.copy_(torch.tensor([0.0, 3.0]))
    fold_into_layer(layer, bn)
    # per-channel factor gamma / std = [1, 2]; bias (b - mean) * factor + beta
    assert torch.equal(layer.weight, torch.tensor([[1.0, 2.0], [6.0, 8.0]]))
    assert torch.equal(layer.bias, torch.tensor([-0.5, 3.0 + 2 * (-3.0)]))


@pytest.mark.parametrize(
    ("layer", "bn_dims", "shape"),
    [
        (lambda: nn.Conv2d(3, 4, 3, bias=False), 2, (2, 3, 5, 5)),
        (lambda: nn.Conv2d(4, 4, 3, groups=4), 2, (2, 4, 5, 5)),
        (lambda: nn.Conv1d(3, 4, 3), 1, (2, 3, 6)),
        (lambda: nn.Linear(3, 4), 1, (5, 3)),
        (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2), 2, (2, 3, 4, 4)),
        (lambda: nn.Conv3d(2, 4, 2), 3, (1, 2, 3, 3, 3)),
    ],
)
def test_folded_layer_equals_layer_then_bn(layer, bn_dims, shape):
    torch.manual_seed(0)
    model = nn.Sequential(layer(), _bn(4, bn_dims)).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = model(x)
    pairs = fold_batchnorms(model, lambda m: m(x))
    assert pairs == [("0", "1")]
    assert isinstance(model[1], nn.Identity)
    assert model[0].bias is not None
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


class Branchy(nn.Module):
    """conv_a -> bn_a (foldable); conv_b's output also feeds the residual (not foldable)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(2, 2, 1)
        self.bn_a = _bn(2)
        self.conv_b = nn.Conv2d(2, 2, 1)
        self.bn_b = _bn(2, seed=1)

    def forward(self, x):
        a = self.bn_a(self.conv_a(x))
        b = self.conv_b(a)
        return self.bn_b(b) + b


def test_layer_output_used_elsewhere_is_not_folded():
    model = Branchy().eval()
    x = torch.randn(1, 2, 3, 3)
    assert find_foldable_pairs(model, lambda m: m(x)) == [("conv_a", "bn_a")]


def test_returned_layer_output_is_not_folded():
    class ReturnsBoth(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), _bn(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y), y

    assert find_foldable_pairs(ReturnsBoth().eval(), lambda m: m(torch.randn(1, 2, 2, 2))) == []


def test_shared_layer_or_shared_bn_is_not_folded():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), _bn(2)
            self.conv2, self.bn2 = nn.Conv2d(2, 2, 1), _bn(2)

        def forward(self, x):
            x = self.bn(self.conv(x))
            x = self.bn(self.conv(x))  # conv and bn called twice
            return self.bn2(self.conv2(x))

    pairs = find_foldable_pairs(Shared().eval(), lambda m: m(torch.randn(1, 2, 2, 2)))
    assert pairs == [("conv2", "bn2")]


def test_bn_after_a_non_foldable_op_is_not_folded():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU(), _bn(2)).eval()
    assert find_foldable_pairs(model, lambda m: m(torch.randn(1, 2, 2, 2))) == []


def test_bn_without_running_stats_is_not_folded():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2, track_running_stats=False))
    model.eval()
    x = torch.randn(2, 2, 3, 3)
    assert fold_batchnorms(model, lambda m: m(x)) == []
    assert isinstance(model[1], nn.BatchNorm2d)


def test_grouped_conv_transpose_is_not_folded():
    model = nn.Sequential(nn.ConvTranspose2d(4, 4, 2, groups=2), _bn(4)).eval()
    x = torch.randn(1, 4, 3, 3)
    with torch.no_grad():
        ref = model(x)
    assert fold_batchnorms(model, lambda m: m(x)) == []
    with torch.no_grad():
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("training", [True, False])
def test_replacement_keeps_the_batchnorms_mode(training):
    model = nn.Sequential(nn.Conv2d(2, 2, 1), _bn(2)).eval()
    model[1].train(training)
    fold_batchnorms(model, lambda m: m(torch.randn(1, 2, 2, 2)))
    assert isinstance(model[1], nn.Identity) and model[1].training is training


def test_nested_bn_is_replaced_under_its_own_name():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(2, 3, 1), _bn(3)), nn.ReLU()).eval()
    x = torch.randn(1, 2, 2, 2)
    assert fold_batchnorms(model, lambda m: m(x)) == [("0.0", "0.1")]
    assert isinstance(model.get_submodule("0.1"), nn.Identity)
