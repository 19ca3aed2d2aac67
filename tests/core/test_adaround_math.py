"""Golden values for AdaRound's equations (docs/weight_reconstruction.md), all computed by hand."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from adaround_core.reconstruction import adaround_math as am


def f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_paper_constants():
    assert am.ADAROUND_ZETA == 1.1
    assert am.ADAROUND_GAMMA == -0.1


# h(V) = clamp(sigmoid(V) * 1.2 - 0.1, 0, 1); sigmoid(ln 3) = 3/4, sigmoid(ln 11) = 11/12.
@pytest.mark.parametrize(
    ("v", "expected"),
    [
        (0.0, 0.5),  # 0.5 * 1.2 - 0.1
        (math.log(3.0), 0.8),  # 0.75 * 1.2 - 0.1
        (-math.log(3.0), 0.2),  # 0.25 * 1.2 - 0.1
        (math.log(11.0), 1.0),  # 11/12 * 1.2 - 0.1: exactly where the clamp starts
        (-math.log(11.0), 0.0),  # 1/12 * 1.2 - 0.1
    ],
)
def test_rectified_sigmoid_golden(v, expected):
    assert am.rectified_sigmoid(f64(v)).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("v", [5.0, 10.0, 50.0, 1e4])
def test_rectified_sigmoid_saturates_exactly(v):
    assert am.rectified_sigmoid(torch.tensor([v])).item() == 1.0
    assert am.rectified_sigmoid(torch.tensor([-v])).item() == 0.0


def test_rectified_sigmoid_range_monotone_and_zero_gradient_when_clamped():
    v = torch.linspace(-20, 20, 2001, requires_grad=True)
    h = am.rectified_sigmoid(v)
    assert h.min().item() == 0.0 and h.max().item() == 1.0
    assert torch.all(h[1:] >= h[:-1])
    h.sum().backward()
    clamped = (h == 0) | (h == 1)
    assert torch.all(v.grad[clamped] == 0)
    assert torch.all(v.grad[~clamped] > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_init_rounding_variable_inverts_rectified_sigmoid(dtype):
    rest = torch.linspace(0, 0.999, 1000, dtype=dtype)
    rest = torch.cat([rest, torch.tensor([0.5], dtype=dtype)])
    v = am.init_rounding_variable(rest)
    assert torch.isfinite(v).all()
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(am.rectified_sigmoid(v), rest, atol=tol, rtol=0)
    assert torch.all(v[1:1000] > v[:999])  # strictly increasing in rest


def test_init_rounding_variable_golden():
    # h(V) = rest  <=>  sigmoid(V) = (rest + 0.1) / 1.2
    assert am.init_rounding_variable(f64(0.5)).item() == pytest.approx(0.0, abs=1e-12)
    assert am.init_rounding_variable(f64(0.8)).item() == pytest.approx(math.log(3.0), abs=1e-12)
    assert am.init_rounding_variable(f64(0.0)).item() == pytest.approx(-math.log(11.0), abs=1e-12)


def test_split_on_grid():
    w = torch.tensor([0.25, -0.25, 1.0, 0.75, -1.5])
    w_floor, rest = am.split_on_grid(w, torch.tensor(0.5))
    assert torch.equal(w_floor, torch.tensor([0.0, -1.0, 2.0, 1.0, -3.0]))
    assert torch.equal(rest, torch.tensor([0.5, 0.5, 0.0, 0.5, 0.0]))


def test_soft_quantized_weight_clamps_to_the_integer_range():
    w_floor = torch.tensor([0.0, -1.0, 2.0, 7.0, -9.0])
    h = torch.tensor([0.5, 1.0, 0.0, 1.0, 0.25])
    out = am.soft_quantized_weight(w_floor, h, torch.tensor(0.5), -8, 7)
    # clamp([0.5, 0, 2, 8, -8.75], -8, 7) * 0.5
    assert torch.equal(out, torch.tensor([0.25, 0.0, 1.0, 3.5, -4.0]))


def test_hard_quantized_weight_rounds_up_where_v_nonnegative():
    w_floor = torch.tensor([0.0, 0.0, 2.0, 7.0, -8.0])
    v = torch.tensor([-1.0, 0.0, 2.0, 3.0, -0.5])
    out = am.hard_quantized_weight(w_floor, v, torch.tensor(0.5), -8, 7)
    # [V >= 0] = [0, 1, 1, 1, 0] -> clamp([0, 1, 3, 8, -8]) * 0.5
    assert torch.equal(out, torch.tensor([0.0, 0.5, 1.5, 3.5, -4.0]))


@pytest.mark.parametrize(
    ("beta", "expected"),
    [
        # h = [0, 1, 0.5, 0.25, 0.75] -> |2h - 1| = [1, 1, 0, 0.5, 0.5]
        (1.0, 0 + 0 + 1 + 0.5 + 0.5),
        (2.0, 0 + 0 + 1 + 0.75 + 0.75),
        (20.0, 0 + 0 + 1 + 2 * (1 - 0.5**20)),
    ],
)
def test_rounding_regularizer_golden(beta, expected):
    h = f64(0.0, 1.0, 0.5, 0.25, 0.75)
    assert am.rounding_regularizer(h, beta).item() == pytest.approx(expected, abs=1e-12)


def test_rounding_regularizer_is_zero_on_hard_rounding():
    assert am.rounding_regularizer(torch.tensor([0.0, 1.0, 1.0, 0.0]), 2.0).item() == 0.0


def test_reconstruction_loss_linear_layout():
    out = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    target = torch.zeros(2, 3)
    # per-sample channel sums [1 + 4, 9] -> mean 7
    assert am.reconstruction_loss(out, target, channel_dim=-1).item() == 7.0


def test_reconstruction_loss_conv_layout():
    diff = torch.zeros(2, 3, 1, 2)  # (N, C, H, W)
    diff[0, :, 0, 0] = torch.tensor([1.0, 1.0, 1.0])  # channel sum 3
    diff[1, 2, 0, 1] = 2.0  # channel sum 4
    # four (n, h, w) positions with channel sums [3, 0, 0, 4] -> mean 7 / 4
    loss = am.reconstruction_loss(diff, torch.zeros_like(diff), channel_dim=1)
    assert loss.item() == 1.75


def _warm_up_oracle(num_steps: int, warm_up: float) -> int:
    """Steps t with t < warm_up * num_steps, in exact decimal arithmetic."""
    limit = Fraction(str(warm_up)) * num_steps
    return sum(1 for t in range(num_steps) if t < limit)


@pytest.mark.parametrize(
    ("num_steps", "warm_up", "expected"),
    [
        (100, 0.2, 20),
        (100, 0.0, 0),
        (100, 1.0, 100),
        (10, 0.25, 3),  # t < 2.5 -> t in {0, 1, 2}
        (7, 0.5, 4),  # t < 3.5
        (100, 0.07, 7),  # 0.07 * 100 == 7.000000000000001 in floating point
        (100, 0.14, 14),
        (100, 0.28, 28),
        (100, 0.56, 56),
        (1, 0.5, 1),
    ],
)
def test_warm_up_steps_golden(num_steps, warm_up, expected):
    assert am.warm_up_steps(num_steps, warm_up) == expected


def test_warm_up_steps_matches_exact_arithmetic():
    for num_steps in (1, 3, 7, 10, 50, 100, 333, 1000):
        for k in range(101):
            warm_up = k / 100
            assert am.warm_up_steps(num_steps, warm_up) == _warm_up_oracle(num_steps, warm_up), (
                num_steps, warm_up)


def test_beta_schedule_default():
    schedule = [am.beta_at(t, 100, 0.2, (20, 2)) for t in range(100)]
    assert schedule[:20] == [None] * 20
    assert schedule[20] == 20.0  # exactly b_range[0] at the first regularised step
    assert schedule[99] == 2.0  # exactly b_range[1] at the last step
    for k in range(80):  # linear: 20 - 18 k / 79
        assert schedule[20 + k] == pytest.approx(20 - 18 * k / 79, abs=1e-12)
    steps = [b - a for a, b in zip(schedule[20:], schedule[21:], strict=False)]
    assert max(steps) - min(steps) < 1e-9


def test_beta_schedule_hand_values():
    # 10 steps, 5 warm-up; beta from 10 to 1 over steps 5..9 -> -2.25 per step
    expected = [None] * 5 + [10.0, 7.75, 5.5, 3.25, 1.0]
    got = [am.beta_at(t, 10, 0.5, (10.0, 1.0)) for t in range(10)]
    assert got[:5] == expected[:5]
    assert got[5:] == pytest.approx(expected[5:], abs=1e-12)


def test_beta_schedule_without_warm_up():
    schedule = [am.beta_at(t, 11, 0.0, (20, 2)) for t in range(11)]
    assert None not in schedule
    assert schedule[0] == 20.0 and schedule[10] == 2.0
    assert schedule == pytest.approx([20 - 1.8 * t for t in range(11)], abs=1e-12)


def test_beta_schedule_all_warm_up():
    assert [am.beta_at(t, 50, 1.0, (20, 2)) for t in range(50)] == [None] * 50


def test_beta_schedule_single_regularised_step_is_in_range():
    beta = am.beta_at(9, 10, 0.9, (20, 2))
    assert beta is not None and 2 <= beta <= 20


def test_beta_schedule_float_warm_up_boundary():
    # 0.07 * 100 steps of warm-up: step 7 is the first regularised one
    assert am.beta_at(6, 100, 0.07, (20, 2)) is None
    assert am.beta_at(7, 100, 0.07, (20, 2)) == 20.0
