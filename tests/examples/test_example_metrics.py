"""The examples' metrics on constructed outputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from examples.minilm.metrics import mean_cosine, nearest_neighbours, neighbour_agreement
from examples.vision.metrics import SNR_CAP_DB, output_agreement, output_snr_db, top1_agreement


def test_cosine_of_identical_embeddings_is_one_and_drops_with_noise():
    x = torch.randn(50, 16)
    assert mean_cosine(x, x) == pytest.approx(1.0)
    assert mean_cosine(-x, x) == pytest.approx(-1.0)
    assert mean_cosine(x + 0.5 * torch.randn(50, 16), x) < 0.99


def test_nearest_neighbours_excludes_the_row_itself():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert nearest_neighbours(x).tolist() == [1, 0, 3, 2]


def test_retrieval_agreement_is_one_for_identical_and_drops_when_perturbed():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    assert neighbour_agreement(x, x) == 1.0
    assert neighbour_agreement(x * 3.0, x) == 1.0  # cosine: scale does not matter
    noisy = x + 0.3 * torch.randn(200, 8, generator=g)
    assert neighbour_agreement(noisy, x) < 0.9
    with pytest.raises(ValueError, match="needs >= 2"):
        neighbour_agreement(x[:1], x[:1])


def test_top1_agreement_counts_matching_argmax():
    reference = torch.eye(4)
    flipped = reference.clone()
    flipped[0] = torch.tensor([0.0, 2.0, 0.0, 0.0])
    assert top1_agreement(reference, reference) == 1.0
    assert top1_agreement(flipped, reference) == 0.75


def test_snr_is_capped_for_identical_outputs_and_exact_otherwise():
    reference = torch.ones(10, 5)
    assert output_snr_db(reference, reference) == SNR_CAP_DB
    noisy = reference + 0.1  # noise power 0.01 per element, signal 1
    assert output_snr_db(noisy, reference) == pytest.approx(20.0)
    assert output_snr_db(reference + 1e-9, reference) == SNR_CAP_DB
    assert math.isfinite(output_snr_db(torch.zeros(2, 2), torch.zeros(2, 2)))


def test_vision_metric_of_the_float_model_is_perfect_and_drops_for_another_model():
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(32, 6)), batch_size=8,
                        collate_fn=lambda rows: torch.stack([r[0] for r in rows]))
    model, other = nn.Linear(6, 10), nn.Linear(6, 10)
    assert output_agreement(model, loader, float_model=model) == {
        "top1_agreement": 1.0, "output_snr_db": SNR_CAP_DB}
    worse = output_agreement(other, loader, float_model=model)
    assert worse["top1_agreement"] < 1.0 and worse["output_snr_db"] < 10.0


class NoParameters(nn.Module):
    """A model with neither parameters nor buffers, as the pipeline's ONNX Runtime module."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.call = inner.__call__  # a bound method: no submodule, no parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.call(x)


def test_a_model_without_parameters_is_scored_on_the_cpu():
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(16, 6)), batch_size=8,
                        collate_fn=lambda rows: torch.stack([r[0] for r in rows]))
    model = nn.Linear(6, 10)
    wrapped = NoParameters(model)
    assert list(wrapped.parameters()) == [] and list(wrapped.buffers()) == []
    assert output_agreement(wrapped, loader, float_model=model)["top1_agreement"] == 1.0
