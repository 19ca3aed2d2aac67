"""Shared tiny models and helpers for the test suite.

Models are a few channels wide so every test runs in well under a second on CPU.
Helpers are exposed as fixtures (the suite has no ``__init__.py`` files).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
import torch
from torch import nn

from adaround_core.quantization import FakeQuantState, prepare_qat_fx, set_fake_quantize
from flows.environment import apply_process_defaults

apply_process_defaults()  # as `python -m flows` does: no telemetry, patient server start


class TinyCNN(nn.Module):
    """Conv-BN-ReLU, a residual Conv-BN block, global pooling and a Linear head."""

    def __init__(self, in_ch: int = 3, width: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


class TinyMLP(nn.Module):
    """Three Linear layers, no BatchNorm: the prepared model in FLOAT is bit-exact."""

    def __init__(self, sizes: tuple[int, ...] = (6, 8, 8, 4)) -> None:
        super().__init__()
        self.fc1 = nn.Linear(sizes[0], sizes[1])
        self.fc2 = nn.Linear(sizes[1], sizes[2])
        self.head = nn.Linear(sizes[2], sizes[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def randomize_batchnorms(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    g = generator or torch.Generator().manual_seed(123)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model


def make_batches(n: int, shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, process: Callable | None = None) -> nn.Module:
    """The seed's calibration: eval mode, CALIBRATION state, one forward per batch."""
    model.eval()
    set_fake_quantize(model, FakeQuantState.CALIBRATION)
    for batch in batches:
        b = process(batch) if process else batch
        if isinstance(b, dict):
            model(**b)
        elif isinstance(b, (tuple, list)):
            model(*b)
        else:
            model(b)
    return model


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of the full state dict (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert list(after) == list(before), "state_dict keys changed"
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"state_dict entries changed: {changed}"


class Helpers:
    """Namespace handed to tests by the ``h`` fixture."""

    TinyCNN = TinyCNN
    TinyMLP = TinyMLP
    randomize_batchnorms = staticmethod(randomize_batchnorms)
    make_batches = staticmethod(make_batches)
    calibrate = staticmethod(calibrate)
    state_snapshot = staticmethod(state_snapshot)
    assert_same_state = staticmethod(assert_same_state)

    @staticmethod
    def cnn(**kwargs) -> nn.Module:
        torch.manual_seed(0)
        return randomize_batchnorms(TinyCNN(**kwargs)).eval()

    @staticmethod
    def calibrated_cnn(num_batches: int = 4, batch: int = 4, **prepare_kwargs):
        """``(float_model, calibrated_prepared_model, batches)`` for the TinyCNN."""
        float_model = Helpers.cnn()
        batches = make_batches(num_batches, (batch, 3, 6, 6))
        q = prepare_qat_fx(float_model, **prepare_kwargs)
        calibrate(q, batches)
        return float_model, q, batches

    @staticmethod
    def mlp() -> nn.Module:
        """A TinyMLP with seeded weights, in eval mode."""
        torch.manual_seed(0)
        return TinyMLP().eval()

    @staticmethod
    def calibrated_mlp(num_batches: int = 4, batch: int = 8, **prepare_kwargs):
        torch.manual_seed(0)
        float_model = TinyMLP().eval()
        batches = make_batches(num_batches, (batch, 6))
        q = prepare_qat_fx(float_model, **prepare_kwargs)
        calibrate(q, batches)
        return float_model, q, batches


FAST = {"num_steps": 20, "progress": False}

# Every test that takes ``device`` runs on the CPU, and on CUDA where a GPU is present.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """The device; on CUDA with full float32 convolutions (the tests compare against
    float32 references, and cuDNN's default TF32 is ~1e-3 off)."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield torch.device(request.param)
    torch.backends.cudnn.allow_tf32 = before


@pytest.fixture
def h() -> type[Helpers]:
    return Helpers


@pytest.fixture
def fast_cfg() -> dict:
    """A small AdaRound config: few steps, no progress bar."""
    return dict(FAST)
