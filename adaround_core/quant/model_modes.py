"""Context managers and copies that put a prepared model into the mode a step needs."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

from torch import nn

from adaround_core.quant.fake_quantize import (
    FakeQuantState,
    fake_quantizers,
    get_fake_quantize_states,
    restore_fake_quantize_states,
)


@contextlib.contextmanager
def fake_quant_state(model: nn.Module, state: FakeQuantState) -> Iterator[None]:
    """Put every fake quantizer in ``state`` for the block; restore the previous states
    after, without recomputing qparams (so the calibration statistics stay as they were)."""
    saved = get_fake_quantize_states(model)
    for fq in fake_quantizers(model):
        fq.set_state(state)
    try:
        yield
    finally:
        restore_fake_quantize_states(model, saved)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block, then every module's previous train/eval flag
    (a model in train mode may hold submodules in eval mode, e.g. frozen BatchNorms)."""
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in was_training.items():
            m.training = training


def float_reference(model: nn.Module) -> nn.Module:
    """A frozen copy of a prepared ``model`` computing in float (take it before rounding)."""
    reference = copy.deepcopy(model)
    for fq in fake_quantizers(reference):
        fq.state = FakeQuantState.FLOAT
    reference.requires_grad_(False)
    return reference
