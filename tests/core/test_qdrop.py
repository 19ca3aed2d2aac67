"""QDrop: the drop mask (rate, determinism under the seed) and no dropping after reconstruction."""

from __future__ import annotations

import math

import pytest
import torch

from adaround_core.quant.fake_quantize import fake_quantizers
from adaround_core.quant.qdrop import drop_mask, qdrop, qdrop_generator
from adaround_core.quantization import (
    FakeQuantState,
    QConfig,
    set_fake_quantize,
    weight_reconstruction,
)

NUM = 200_000


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_rate_is_drop_prob_within_binomial_tolerance(p):
    mask = drop_mask(torch.empty(NUM), p, qdrop_generator(0, "layer1.0"))
    sigma = math.sqrt(p * (1 - p) / NUM)
    assert abs(mask.float().mean().item() - p) < 5 * sigma


def test_same_seed_and_unit_give_the_same_masks():
    a, b = qdrop_generator(3, "fc"), qdrop_generator(3, "fc")
    for _ in range(3):  # a fresh mask every call, the same sequence both times
        assert torch.equal(drop_mask(torch.empty(1000), 0.5, a), drop_mask(torch.empty(1000), 0.5, b))


@pytest.mark.parametrize("other", [(4, "fc"), (3, "head")])
def test_another_seed_or_unit_gives_other_masks(other):
    mask = drop_mask(torch.empty(1000), 0.5, qdrop_generator(3, "fc"))
    assert not torch.equal(mask, drop_mask(torch.empty(1000), 0.5, qdrop_generator(*other)))


def test_dropped_elements_are_float_the_others_quantized():
    x = torch.randn(1000)
    quantized = torch.round(x * 4) / 4
    out = qdrop(x, quantized, 0.5, qdrop_generator(0, "u"))
    mask = drop_mask(x, 0.5, qdrop_generator(0, "u"))
    assert torch.equal(out[mask], x[mask]) and torch.equal(out[~mask], quantized[~mask])


def test_zero_drop_prob_is_the_quantized_tensor_itself():
    x, quantized = torch.randn(10), torch.zeros(10)
    assert qdrop(x, quantized, 0.0, qdrop_generator(0, "u")) is quantized


def test_no_dropping_after_reconstruction(h, fast_cfg):
    _, q, batches = h.calibrated_cnn(qconfig=QConfig(activation_bits=4))
    weight_reconstruction(q, batches, None, {**fast_cfg, "drop_prob": 0.5})
    assert all(fq.substitute is None for fq in fake_quantizers(q))
    set_fake_quantize(q, FakeQuantState.VALIDATION)
    with torch.no_grad():
        first, second = q(batches[0]), q(batches[0])
    assert torch.equal(first, second)


def test_the_seed_fixes_the_result_and_changes_it(h, fast_cfg):
    def rounded(seed: int) -> dict[str, torch.Tensor]:
        _, q, batches = h.calibrated_cnn(qconfig=QConfig(activation_bits=4))
        weight_reconstruction(q, batches, None, {**fast_cfg, "drop_prob": 0.5, "seed": seed,
                                                 "guard": False})
        return {k: v.clone() for k, v in q.state_dict().items() if k.endswith(".weight")}

    a, b, c = rounded(0), rounded(0), rounded(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
