"""The ``FakeQuantize`` module and the model-wide state switch ``set_fake_quantize``.

A ``FakeQuantize`` only holds buffers, an observer and flags; the math lives in
:mod:`adaround_core.quant.quant_math`.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

from adaround_core.calibration.activation_codes import ActivationCodes, integer_codes
from adaround_core.quant.quant_math import fake_quantize

logger = logging.getLogger(__name__)


class FakeQuantState(str, enum.Enum):
    """What every fake quantizer of a prepared model does in ``forward``."""

    CALIBRATION = "calibration"  # observers collect statistics; values pass through unchanged
    VALIDATION = "validation"  # fixed-scale fake quantization; observers are ignored
    FLOAT = "float"  # every fake quant is off: the prepared model computes in float


class FakeQuantize(nn.Module):
    """Observer plus fake quantizer for one tensor (an activation or a weight).

    ``axis`` is None for per-tensor quantization, else the channel axis. Once
    ``frozen``, the qparams never change again (weights after AdaRound: their
    rounded values must stay on the grid they were rounded to).

    ``substitute``, while set, replaces the VALIDATION-state fake quantization: block
    reconstruction sets it on the quantizers of the unit it optimises (soft-rounded
    weights, QDrop, learned activation scales) and clears it afterwards.
    """

    substitute: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __init__(self, observer: nn.Module, qmin: int, qmax: int, num_channels: int = 1,
                 axis: int | None = None) -> None:
        super().__init__()
        self.observer = observer
        self.qmin, self.qmax, self.axis = qmin, qmax, axis
        self.register_buffer("scale", torch.ones(num_channels))
        self.register_buffer("zero_point", torch.zeros(num_channels))
        self.register_buffer("calibrated", torch.tensor(False))  # qparams came from data
        self.register_buffer("frozen", torch.tensor(False))
        self.state = FakeQuantState.FLOAT
        self.pending = False  # observed data not yet turned into qparams

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.state is FakeQuantState.CALIBRATION:
            if not self.frozen:
                self.observer.observe(x)
                self.pending = True
            return x
        if self.state is FakeQuantState.VALIDATION:
            if self.substitute is not None:
                return self.substitute(x)
            return fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax, self.axis)
        return x

    def codes(self, x: torch.Tensor) -> ActivationCodes | None:
        """``self(x)`` as integer grid indices whose decoding equals it bit for bit, where
        this quantizer fake-quantizes per tensor with fixed qparams (VALIDATION, no
        ``substitute``); None otherwise or where the codes cannot reproduce ``self(x)``."""
        if self.state is not FakeQuantState.VALIDATION or self.substitute is not None \
                or self.axis is not None:
            return None
        return integer_codes(x, self.scale, self.zero_point, self.qmin, self.qmax)

    @property
    def has_qparams(self) -> bool:
        """Whether qparams exist or can be computed (calibrated, frozen or observed)."""
        return bool(self.calibrated) or bool(self.frozen) or self.pending

    def update_qparams(self) -> None:
        """Turn newly observed data into scale and zero point (no-op when frozen, or when
        nothing was observed since the last update, e.g. after loading a checkpoint)."""
        if self.frozen or not self.pending:
            return
        self.pending = False
        scale, zero_point = self.observer.qparams(self.qmin, self.qmax)
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        self.calibrated.fill_(True)

    def freeze(self) -> None:
        """Fix the current qparams for good."""
        self.frozen.fill_(True)

    def set_state(self, state: FakeQuantState) -> None:
        """Switch the state; entering VALIDATION computes qparams from what was observed."""
        state = FakeQuantState(state)
        if state is FakeQuantState.VALIDATION:
            self.update_qparams()
        self.state = state

    def extra_repr(self) -> str:
        axis = "per_tensor" if self.axis is None else f"axis={self.axis}"
        return f"qrange=[{self.qmin}, {self.qmax}], {axis}, state={self.state.value}"


def fake_quantizers(model: nn.Module) -> list[FakeQuantize]:
    """Every ``FakeQuantize`` of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, FakeQuantize)]


def set_fake_quantize(model: nn.Module, state: FakeQuantState) -> nn.Module:
    """Put every fake quantizer of a prepared ``model`` into ``state``; returns the model."""
    quantizers = fake_quantizers(model)
    if not quantizers:
        raise ValueError("set_fake_quantize: the model has no fake quantizers; "
                         "call prepare_qat_fx(model) first")
    for fq in quantizers:
        fq.set_state(state)
    logger.debug("set %d fake quantizers to %s", len(quantizers), FakeQuantState(state).value)
    return model


def get_fake_quantize_states(model: nn.Module) -> dict[str, FakeQuantState]:
    """The state of every fake quantizer, by qualified name."""
    return {name: m.state for name, m in model.named_modules() if isinstance(m, FakeQuantize)}


def restore_fake_quantize_states(model: nn.Module, states: dict[str, FakeQuantState]) -> None:
    """Put fake quantizers back into states captured by :func:`get_fake_quantize_states`,
    without recomputing any qparams."""
    modules = dict(model.named_modules())
    for name, state in states.items():
        modules[name].state = state


@contextlib.contextmanager
def substituted(substitutes: dict[FakeQuantize, Callable[[torch.Tensor], torch.Tensor]],
                ) -> Iterator[None]:
    """Set :attr:`FakeQuantize.substitute` of each quantizer for the block; clear it after."""
    for fq, substitute in substitutes.items():
        fq.substitute = substitute
    try:
        yield
    finally:
        for fq in substitutes:
            fq.substitute = None
