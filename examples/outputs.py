"""Run a model and its float reference over an evaluation DataLoader."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader


@torch.no_grad()
def paired_outputs(model: nn.Module, float_model: nn.Module,
                   loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """``model``'s and ``float_model``'s outputs on every batch, concatenated on the CPU."""
    outputs, reference = [], []
    for batch in loader:
        outputs.append(run_model(model, batch).float().cpu())
        reference.append(outputs[-1] if model is float_model
                         else run_model(float_model, batch).float().cpu())
    if not outputs:
        raise ValueError("the evaluation DataLoader yielded no batch: give it samples")
    return torch.cat(outputs), torch.cat(reference)


def run_model(model: nn.Module, batch: Any) -> torch.Tensor:
    """A dict batch as keyword arguments, a tensor as the one argument, on the model's device."""
    device = model_device(model)
    if isinstance(batch, dict):
        return model(**{k: v.to(device) for k, v in batch.items()})
    return model(batch.to(device))


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer; the CPU for a model with neither
    (the pipeline's ONNX Runtime module)."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device
