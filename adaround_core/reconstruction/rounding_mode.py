"""``rounding_mode``: the one mode every rounding step runs the model in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from adaround_core.calibration.batches import model_device
from adaround_core.quant.fake_quantize import FakeQuantState
from adaround_core.quant.model_modes import eval_mode, fake_quant_state
from adaround_core.reconstruction.threads import choose_threads, intra_op_threads


@contextlib.contextmanager
def rounding_mode(model: nn.Module, num_threads: int | None = None) -> Iterator[int]:
    """Run the block with the torch intra-op threads chosen for the model's device
    (``num_threads`` if given), ``model`` in eval mode and every fake quantizer in
    VALIDATION (fixed scales); everything is restored afterwards, also on error.
    Capturing activations and rounding both run in it, so cached activations equal the
    in-memory ones bit for bit. Yields the thread count used."""
    threads = choose_threads(num_threads, model_device(model))
    with intra_op_threads(threads), eval_mode(model), \
            fake_quant_state(model, FakeQuantState.VALIDATION):
        yield threads
