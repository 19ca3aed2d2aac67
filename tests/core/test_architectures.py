"""End to end on a model mixing the architectures users bring: residual blocks with
depthwise convs and a downsampling branch, ConvTranspose2d, Conv1d, a Transformer
encoder (MultiheadAttention) and a Linear head."""

from __future__ import annotations

import torch
from torch import nn

from adaround_core import quantization as q
from adaround_core.quant.quant_layers import quant_layers
from adaround_core.quant.quant_math import fake_quantize


class _Block(nn.Module):
    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        in_channels = channels if stride == 1 else channels // 2
        self.c1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(channels)
        self.c2 = nn.Conv2d(channels, channels, 3, 1, 1, groups=channels, bias=False)
        self.b2 = nn.BatchNorm2d(channels)
        self.down = (nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                   nn.BatchNorm2d(channels)) if stride > 1 else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return torch.relu(y + self.down(x))


class _MixedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.l1, self.l2 = _Block(8), _Block(16, stride=2)
        self.up = nn.ConvTranspose2d(16, 8, 2, 2)
        self.c1d = nn.Conv1d(8, 8, 3, padding=1)
        layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(self.l2(self.l1(self.stem(x))))
        tokens = self.c1d(x.flatten(2)).transpose(1, 2)
        return self.head(self.enc(tokens).mean(1))


EXPECTED_ORDER = ["stem", "l1.c1", "l1.c2", "l2.c1", "l2.c2", "l2.down.0", "up", "c1d",
                  "enc.layers.0.self_attn.out_proj", "enc.layers.0.linear1",
                  "enc.layers.0.linear2", "head"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = _MixedNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_mixed_architecture_is_rounded_in_call_order_onto_the_grid(device):
    float_model = _model().to(device)
    batches = [torch.randn(8, 3, 8, 8) for _ in range(3)]  # on the CPU: moved once
    model = q.prepare_qat_fx(float_model, q.QConfig(weight_bits=4))
    q.set_fake_quantize(model, q.FakeQuantState.CALIBRATION)
    first = batches[0].to(device)
    with torch.no_grad():
        for b in batches:
            model(b.to(device))
        with_fq_off = q.set_fake_quantize(model, q.FakeQuantState.FLOAT)(first)
    # BatchNorm folding (on the first forward) kept the float function exactly
    torch.testing.assert_close(with_fq_off, float_model(first), rtol=1e-4, atol=1e-5)
    q.set_fake_quantize(model, q.FakeQuantState.CALIBRATION)
    report = q.weight_reconstruction(model, batches, None, {"num_steps": 30, "progress": False})

    assert [r.name for r in report] == EXPECTED_ORDER
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Identity)
            and n.startswith(("l1.b", "l2.b", "l2.down.1"))] == ["l1.b1", "l1.b2", "l2.b1",
                                                                 "l2.b2", "l2.down.1"]
    for name, layer in quant_layers(model).items():
        fq = layer.weight_fake_quant
        on_grid = fake_quantize(layer.weight, fq.scale, fq.zero_point, fq.qmin, fq.qmax,
                                layer.weight_axis)
        assert torch.equal(on_grid, layer.weight), name
        assert layer.weight.device.type == device.type, name
