"""The guard at the model's output (``guard: output``).

After a unit (a layer, or a block's layers) is reconstructed, the model's output on held-out
calibration batches is compared with the float model's output, once with the unit's learned
state and once with its nearest state (:mod:`~.unit_state`: nearest rounding, calibrated
activation scales), every earlier unit as decided, every later one still nearest; the state
with the smaller mean squared error is kept as a whole. The unit's own guard (``guard: layer``)
sees only the unit's output, and can keep roundings that each lower their unit's error yet
raise the model's.

The held-out batches are ``guard_batches`` whole calibration batches (a batch may be a tensor,
a tuple or a dict, which cannot be split into samples in general), chosen by ``seed`` and
left out of every unit's optimisation. The float model's outputs on them are computed once.
Outputs may be tensors or any nesting of tuples, lists and dicts of tensors: the error is
taken over every floating-point tensor in them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sized
from typing import Any

import torch
from torch import nn

from adaround_core.calibration.batches import call_model
from adaround_core.quant.model_modes import eval_mode
from adaround_core.reconstruction.reconstruction_config import AdaRoundConfig
from adaround_core.reconstruction.unit_state import LEARNED, NEAREST, UnitState
from adaround_core.torch_private import tree_leaves

logger = logging.getLogger(__name__)

GUARD_LAYER, GUARD_OUTPUT, GUARD_OFF = "layer", "output", "off"
ADAROUND = "adaround"
NEAREST_BY_LAYER = "nearest(layer)"  # the layer's held-out output error was lower with nearest
NEAREST_BY_OUTPUT = "nearest(output)"  # the model's held-out output error was lower with nearest


def held_out_indices(num_batches: int, count: int, seed: int) -> list[int]:
    """Sorted indices of the ``count`` calibration batches (of ``num_batches``) that the
    output guard holds out, chosen by ``seed``; at least one batch is left for optimisation,
    so a single batch cannot be held out (empty list)."""
    held = min(count, num_batches - 1)
    if held < 1:
        return []
    order = torch.randperm(num_batches, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:held].tolist())


class TrainingBatches:
    """``batches`` without the held-out ones (re-iterable, streamed as the source is)."""

    def __init__(self, batches: Iterable[Any], held: list[int]) -> None:
        self._batches, self._held = batches, set(held)

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self._batches):
            if i not in self._held:
                yield batch


def split_held_out(batches: Iterable[Any], count: int, seed: int,
                   ) -> tuple[Iterable[Any], list[Any]]:
    """``(training batches, held-out batches)`` for the output guard (the training batches
    a list when ``batches`` is one). With one batch only, nothing can be held out: the guard
    then judges on it, with a warning."""
    is_list = isinstance(batches, (list, tuple))
    num_batches = len(batches) if isinstance(batches, Sized) else sum(1 for _ in batches)
    held = held_out_indices(num_batches, count, seed)
    if not held:
        logger.warning("guard=output: one calibration batch only, none can be held out; the "
                       "model's output is judged on the batch the rounding was optimised on")
        return batches, [next(iter(batches))]
    training = TrainingBatches(batches, held)
    chosen = set(held)
    return list(training) if is_list else training, _chosen(batches, chosen)


def _chosen(batches: Iterable[Any], chosen: set[int]) -> list[Any]:
    """The batches at the ``chosen`` indices, read no further than the last of them."""
    picked = []
    for i, batch in enumerate(batches):
        if i in chosen:
            picked.append(batch)
            if len(picked) == len(chosen):
                break
    return picked


def output_error(outputs: Any, references: Any) -> tuple[float, int]:
    """Sum of squared differences over the floating-point tensors of two model outputs of
    the same structure, and the number of elements compared."""
    total, count = 0.0, 0
    for out, ref in zip(tree_leaves(outputs), tree_leaves(references), strict=True):
        if isinstance(ref, torch.Tensor) and ref.is_floating_point():
            total += (out.float() - ref.float()).pow(2).sum().item()
            count += ref.numel()
    return total, count


class OutputGuard:
    """The model's output error on held-out batches, against the float model's output.

    ``model`` is the quantized model being rounded (called in the state rounding runs in);
    ``float_model`` computes in float (``float_reference``); its outputs on ``batches`` are
    computed here, once."""

    def __init__(self, model: nn.Module, float_model: nn.Module, batches: list[Any]) -> None:
        if not batches:
            raise ValueError("guard=output needs at least one held-out calibration batch")
        self.model, self.batches = model, list(batches)
        with torch.no_grad(), eval_mode(float_model):
            self.references = [call_model(float_model, b) for b in self.batches]
        if output_error(self.references, self.references)[1] == 0:  # before any rounding
            raise ValueError("guard=output: the model's output holds no floating-point tensor "
                             "to compare; use guard: layer")

    @torch.no_grad()
    def error(self) -> float:
        """Mean squared error of the model's output over the held-out batches."""
        total, count = 0.0, 0
        for batch, reference in zip(self.batches, self.references, strict=True):
            batch_total, batch_count = output_error(call_model(self.model, batch), reference)
            total, count = total + batch_total, count + batch_count
        return total / count

    def compare(self, state: UnitState) -> tuple[float, float]:
        """``(error with the unit's nearest state, error with its learned state)``; the
        model is left as it was."""
        errors = []
        for which in (NEAREST, LEARNED):
            with state.applied(which):
                errors.append(self.error())
        return errors[0], errors[1]

def guarded_batches(model: nn.Module, float_model: nn.Module, batches: Iterable[Any],
                    cfg: AdaRoundConfig) -> tuple[Iterable[Any], OutputGuard | None]:
    """The batches units are captured on, and the output guard on the held-out ones
    (``guard: output``; otherwise every batch, and no guard)."""
    if cfg.guard != GUARD_OUTPUT:
        return batches, None
    training, held_out = split_held_out(batches, cfg.guard_batches, cfg.seed)
    return training, OutputGuard(model, float_model, held_out)


def decide(guard: str, layer_errors: tuple[float, float],
           output_errors: tuple[float, float] | None) -> str:
    """The rounding a guard keeps, from the ``(nearest, adaround)`` errors it judges by."""
    if guard == GUARD_LAYER and layer_errors[1] > layer_errors[0]:
        return NEAREST_BY_LAYER
    if guard == GUARD_OUTPUT:
        if output_errors is None:
            raise ValueError("guard=output needs an OutputGuard (held-out model inputs)")
        if output_errors[1] > output_errors[0]:
            return NEAREST_BY_OUTPUT
    return ADAROUND
