"""FLOPs of one AdaRound step, counted from the weight and input shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from adaround_core.quant.quant_layers import quant_layers
from adaround_core.quantization import QConfig, prepare_qat_fx
from adaround_core.reconstruction.step_flops import (
    LargestCall,
    forward_flops,
    step_flops,
)

# (layer, input shape, forward FLOPs = 2 * MACs, computed by hand)
CASES = [
    (nn.Linear(64, 10), (32, 64), 2 * 32 * 64 * 10),
    (nn.Linear(8, 4), (3, 5, 8), 2 * 3 * 5 * 8 * 4),  # a sequence: every position counts
    (nn.Conv2d(3, 64, 7, stride=2, padding=3), (2, 3, 32, 32),
     2 * 2 * 16 * 16 * 64 * 3 * 7 * 7),  # 32 -> 16 with stride 2
    (nn.Conv2d(16, 16, 3, padding=1, groups=16), (2, 16, 9, 9),
     2 * 2 * 9 * 9 * 16 * 1 * 3 * 3),  # depthwise: C_in / groups = 1
    (nn.Conv2d(4, 6, 3, stride=2, dilation=2), (2, 4, 17, 13),
     2 * 2 * 7 * 5 * 6 * 4 * 3 * 3),  # (17 - 5) // 2 + 1 = 7, (13 - 5) // 2 + 1 = 5
    (nn.Conv1d(4, 6, 3, padding="same", dilation=2), (4, 10),
     2 * 10 * 6 * 4 * 3),  # unbatched, "same" keeps the length
    (nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1, groups=2),
     (2, 8, 5, 5), 2 * 2 * 5 * 5 * 8 * (4 // 2) * 3 * 3),  # per input position
]


@pytest.mark.parametrize(("layer", "shape", "expected"), CASES)
def test_forward_flops_by_hand_and_by_torch(layer, shape, expected):
    assert forward_flops(layer, shape) == expected
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(shape))
    assert counter.get_total_flops() == expected


def test_a_step_is_forward_plus_weight_gradient_on_one_batch():
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    # ResNet-18's layer1 conv at 224, batch 32: 56x56 maps, 3.7 GMAC forward
    assert step_flops(conv, (64, 56, 56), 32) == 2 * 2 * 32 * 56 * 56 * 64 * 64 * 9


def test_quantized_layers_are_counted_like_their_float_class():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    layers = quant_layers(prepare_qat_fx(model, QConfig()))
    assert step_flops(layers["0"], (3, 6, 6), 4) == 2 * 2 * 4 * 16 * 8 * 27
    assert step_flops(layers["2"], (128,), 4) == 2 * 2 * 4 * 128 * 5


def test_the_largest_call_is_measured_inside_the_block_only():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    q = prepare_qat_fx(model, QConfig())
    layers = quant_layers(q)
    x = torch.randn(4, 3, 6, 6)
    conv = 2 * 4 * 16 * 8 * 27  # batch 4, 4x4 outputs: larger than the Linear's 2*4*128*5
    with LargestCall(layers.values()) as both, torch.no_grad():
        q(x)
    with LargestCall([layers["2"]]) as linear, torch.no_grad():
        q(x)
    q(torch.randn(9, 3, 6, 6))  # after the blocks: not measured
    assert (both.flops, linear.flops) == (conv, 2 * 4 * 128 * 5)
    assert not any(layer._forward_pre_hooks for layer in layers.values())


def test_unknown_layer_is_an_error():
    with pytest.raises(TypeError, match="Bilinear"):
        forward_flops(nn.Bilinear(2, 2, 2), (1, 2))
