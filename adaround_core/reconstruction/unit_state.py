"""A unit's two candidate states: nearest rounding, or what reconstruction learned.

A unit (one layer, or a block's layers) ends reconstruction with two states a guard chooses
between as a whole: its state before reconstruction (every weight rounded to nearest, the
activation quantizers with their calibrated scales and zero points), and the learned one
(every weight with its learned rounding, learned activation scales where they were
trained). :class:`UnitState` holds both values of each tensor that differs, can put either
into the model for a moment (the output guard's comparison), and writes the kept one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from adaround_core.quant.fake_quantize import FakeQuantize

NEAREST, LEARNED = "nearest", "learned"


class UnitState:
    """Tensors of the model (weights, activation scales) with their nearest and learned
    values, and the quantizers to freeze when the learned state is written."""

    def __init__(self) -> None:
        self._entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._freeze_if_learned: list[FakeQuantize] = []

    def add(self, tensor: torch.Tensor, nearest: torch.Tensor, learned: torch.Tensor) -> None:
        """One tensor of the model and its two candidate values (held, not copied: they must
        not be the model's tensors or change before the state is written)."""
        self._entries.append((tensor, nearest.detach(), learned.detach()))

    def add_learned_scale(self, quantizer: FakeQuantize, scale: torch.Tensor) -> None:
        """An activation quantizer whose scale was learned (frozen once it is kept); its
        nearest value is the calibrated scale it holds now."""
        self.add(quantizer.scale, quantizer.scale.detach().clone(), scale)
        self._freeze_if_learned.append(quantizer)

    @torch.no_grad()
    def _put(self, which: str) -> None:
        if which not in (NEAREST, LEARNED):
            raise ValueError(f"a unit state is {NEAREST!r} or {LEARNED!r}, not {which!r}")
        for tensor, nearest, learned in self._entries:
            tensor.copy_(nearest if which == NEAREST else learned)

    def write(self, which: str) -> None:
        """Put the ``which`` state into the model for good (learned: freezing the quantizers
        whose scales were learned)."""
        self._put(which)
        if which == LEARNED:
            for quantizer in self._freeze_if_learned:
                quantizer.freeze()

    @contextlib.contextmanager
    def applied(self, which: str) -> Iterator[None]:
        """The ``which`` state in the model for the block; the tensors restored after."""
        with torch.no_grad():
            saved = [tensor.detach().clone() for tensor, _, _ in self._entries]
        try:
            self._put(which)
            yield
        finally:
            with torch.no_grad():
                for (tensor, _, _), value in zip(self._entries, saved, strict=True):
                    tensor.copy_(value)
