"""A test model factory: the demo's DigitsCNN behind a data-dependent branch.

Same parameters and numbers as ``DigitsCNN`` (the tiny checkpoints load into it), but
``torch.fx`` cannot trace its forward, so the pipeline falls back to per-layer capture.
"""

from __future__ import annotations

import torch

from adaround_core.demo.models import DigitsCNN


class BranchyDigitsCNN(DigitsCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(torch.isfinite(x).all()):  # control flow on a value: not traceable
            return super().forward(x)
        raise ValueError("non-finite input")
