"""Metric: how close a quantized classifier's logits stay to the float model's."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import DataLoader

from examples.outputs import paired_outputs

SNR_CAP_DB = 120.0  # reported for identical outputs (the float model itself) and above


def output_agreement(model: nn.Module, loader: DataLoader, *,
                     float_model: nn.Module) -> dict[str, float]:
    """``top1_agreement``: share of samples whose arg-max class matches ``float_model``'s;
    ``output_snr_db``: signal-to-noise ratio of the logits over the whole evaluation set,
    ``10 log10(sum f^2 / sum (q - f)^2)``, capped at ``SNR_CAP_DB`` (the float model's value)."""
    logits, reference = paired_outputs(model, float_model, loader)
    return {"top1_agreement": top1_agreement(logits, reference),
            "output_snr_db": output_snr_db(logits, reference)}


def top1_agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of rows whose arg-max index is the same in both ``[N, C]`` tensors."""
    return (logits.argmax(dim=1) == reference.argmax(dim=1)).double().mean().item()


def output_snr_db(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """``10 log10(signal / noise)`` in dB, at most :data:`SNR_CAP_DB`."""
    signal = reference.double().pow(2).sum().item()
    noise = (outputs.double() - reference.double()).pow(2).sum().item()
    if noise == 0.0:
        return SNR_CAP_DB
    if signal == 0.0:
        return -SNR_CAP_DB
    return min(SNR_CAP_DB, 10.0 * math.log10(signal / noise))
