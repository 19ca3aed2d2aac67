"""Fake-quant math against torch's reference kernels (bit-exact) and hand-computed qparams."""

from __future__ import annotations

import pytest
import torch

from adaround_core.quant import quant_math as qm


@pytest.mark.parametrize(
    ("bits", "expected"), [(2, (-2, 1)), (3, (-4, 3)), (4, (-8, 7)), (8, (-128, 127))]
)
def test_symmetric_qrange(bits, expected):
    assert qm.symmetric_qrange(bits) == expected


@pytest.mark.parametrize(("bits", "expected"), [(2, (0, 3)), (4, (0, 15)), (8, (0, 255))])
def test_unsigned_qrange(bits, expected):
    assert qm.unsigned_qrange(bits) == expected


def _weight_with_ties(shape: tuple[int, ...], axis: int, scale: torch.Tensor) -> torch.Tensor:
    """Random weight whose channels span different ranges, plus exact .5 ties and
    out-of-range values so rounding direction and clamping are both exercised."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=g)
    view = [1] * len(shape)
    view[axis] = -1
    w = w * torch.linspace(0.1, 2.0, shape[axis]).reshape(view)
    flat = w.view(-1)
    s = scale.reshape(view).expand(shape).reshape(-1)
    flat[:6] = torch.tensor([0.5, -0.5, 1.5, -1.5, 2.5, -3.5]) * s[:6]  # ties
    flat[6:8] = torch.tensor([1000.0, -1000.0])  # clamped
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(
    ("shape", "axis"),
    [((6, 5, 3, 3), 0), ((6, 5, 3, 3), 1), ((7, 9), 0), ((7, 9), 1), ((4, 3, 5), 1)],
)
def test_per_channel_fake_quantize_matches_torch_bit_exact(bits, shape, axis):
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = torch.linspace(0.01, 0.3, shape[axis])
    w = _weight_with_ties(shape, axis, scale)
    zero_point = torch.zeros(shape[axis], dtype=torch.int32)
    expected = torch.fake_quantize_per_channel_affine(w, scale, zero_point, axis, qmin, qmax)
    got = qm.fake_quantize(w, scale, zero_point.float(), qmin, qmax, axis=axis)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_with_observed_symmetric_scale_matches_torch(bits):
    qmin, qmax = qm.symmetric_qrange(bits)
    w = torch.randn(8, 4, 3, 3)
    scale = qm.symmetric_scale(qm.channel_amax(w, 0), qmin, qmax)
    zp = torch.zeros(8, dtype=torch.int32)
    expected = torch.fake_quantize_per_channel_affine(w, scale, zp, 0, qmin, qmax)
    assert torch.equal(qm.fake_quantize(w, scale, zp.float(), qmin, qmax, axis=0), expected)


# with a gradient to compute, fake_quantize builds the formula from new tensors; without, in place
GRAD = pytest.mark.parametrize("grad", [True, False], ids=["formula", "in-place"])


@GRAD
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("zero_point_frac", [0.0, 0.3, 0.5, 1.0])
def test_per_tensor_affine_fake_quantize_matches_torch_bit_exact(bits, zero_point_frac, grad):
    qmin, qmax = 0, 2**bits - 1
    zero_point = round(zero_point_frac * qmax)
    scale = 0.037
    x = torch.randn(4, 3, 5, 5) * 3 + 0.5
    x.view(-1)[:4] = (torch.tensor([0.5, 1.5, -0.5, 2.5]) * scale)  # ties
    expected = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    got = qm.fake_quantize(x.requires_grad_(grad), torch.tensor(scale),
                           torch.tensor(float(zero_point)), qmin, qmax)
    assert got.requires_grad == grad
    assert torch.equal(got.detach(), expected)


@GRAD
def test_per_tensor_with_affine_qparams_matches_torch_tensor_qparams(grad):
    x = torch.randn(64, 8) * 2 + 1
    scale, zp = qm.affine_qparams(x.min(), x.max(), 0, 255)
    expected = torch.fake_quantize_per_tensor_affine(x, scale, zp.to(torch.int32), 0, 255)
    got = qm.fake_quantize(x.requires_grad_(grad), scale, zp, 0, 255)
    assert torch.equal(got.detach(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_in_place_fake_quantize_is_the_formula_bit_for_bit(monkeypatch, dtype):
    """A large contiguous tensor is fake-quantized chunk by chunk (a chunk size that does
    not divide it, so the last chunk is short): the formula's bits, in a new tensor."""
    monkeypatch.setattr(qm, "FAKE_QUANT_CHUNK", 7)
    x = (torch.randn(5, 3, 4, dtype=dtype) * 3 + 0.5)
    x.view(-1)[:4] = torch.tensor([0.5, 1.5, -0.5, 2.5], dtype=dtype) * 0.037  # ties
    scale, zero_point = torch.tensor(0.037), torch.tensor(3.0)
    assert qm._chunkable(x, scale, zero_point)
    expected = qm.dequantize(qm.quantize_to_int(x, scale, zero_point, 0, 15), scale, zero_point)
    original = x.clone()
    got = qm.fake_quantize(x, scale, zero_point, 0, 15)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert torch.equal(x, original)  # the input is left as it was
    assert not qm._chunkable(x.transpose(0, 2), scale, zero_point)  # not contiguous
    assert not qm._chunkable(x, torch.full((5, 1, 1), 0.037), zero_point)  # per channel


def test_quantize_dequantize_roundtrip_on_grid():
    scale, zp = torch.tensor(0.25), torch.tensor(3.0)
    q = torch.arange(0.0, 16.0)
    x = qm.dequantize(q, scale, zp)
    assert torch.equal(x, (q - 3) * 0.25)
    assert torch.equal(qm.quantize_to_int(x, scale, zp, 0, 15), q)


def test_symmetric_scale_hand_values():
    amax = torch.tensor([1.5, 3.0, 0.0])
    scale = qm.symmetric_scale(amax, -8, 7)  # amax / 7.5
    torch.testing.assert_close(scale, torch.tensor([0.2, 0.4, qm.SCALE_EPS]))
    scale8 = qm.symmetric_scale(torch.tensor([127.5]), -128, 127)
    assert scale8.item() == 1.0


@pytest.mark.parametrize(
    ("lo", "hi", "scale", "zero_point"),
    [
        (-1.0, 3.0, 4.0 / 255, 64.0),  # zp = -round(-1 / (4 / 255)) = round(63.75)
        (1.0, 3.0, 3.0 / 255, 0.0),  # range widened down to 0
        (-3.0, -1.0, 3.0 / 255, 255.0),  # range widened up to 0
        (-2.55, 0.0, 0.01, 255.0),
    ],
)
def test_affine_qparams_hand_values(lo, hi, scale, zero_point):
    s, z = qm.affine_qparams(torch.tensor(lo), torch.tensor(hi), 0, 255)
    assert s.item() == pytest.approx(scale, rel=1e-6)
    assert z.item() == zero_point


def test_affine_qparams_degenerate_range_has_positive_scale():
    s, z = qm.affine_qparams(torch.tensor(0.0), torch.tensor(0.0), 0, 255)
    assert s.item() > 0 and z.item() == 0.0


def test_channel_amax():
    w = torch.tensor([[1.0, -3.0], [-0.5, 0.25], [0.0, 0.0]])
    assert torch.equal(qm.channel_amax(w, 0), torch.tensor([3.0, 0.5, 0.0]))
    assert torch.equal(qm.channel_amax(w, 1), torch.tensor([1.0, 3.0]))


def test_mse_symmetric_scale_not_worse_than_minmax():
    w = torch.randn(6, 256)
    w[0, 0] = 8.0  # one outlier among 256 values: clipping it pays off for channel 0
    qmin, qmax = -8, 7
    minmax = qm.symmetric_scale(qm.channel_amax(w, 0), qmin, qmax)
    mse = qm.mse_symmetric_scale(w, 0, qmin, qmax)
    zp = torch.zeros(6, dtype=torch.int32)

    def err(scale):
        fq = torch.fake_quantize_per_channel_affine(w, scale, zp, 0, qmin, qmax)
        return (fq - w).pow(2).sum(dim=1)

    assert torch.all(err(mse) <= err(minmax))
    assert err(mse)[0] < err(minmax)[0]
    assert torch.all(mse <= minmax * (1 + 1e-6)) and torch.all(mse >= 0.2 * minmax * (1 - 1e-6))
