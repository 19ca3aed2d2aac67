"""Metric: how close quantized sentence embeddings stay to the float model's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from examples.outputs import paired_outputs


def embedding_agreement(model: nn.Module, loader: DataLoader, *,
                        float_model: nn.Module) -> dict[str, float]:
    """``cosine``: mean cosine between ``model``'s and ``float_model``'s embedding of each
    evaluation sentence; ``retrieval_agreement``: share of sentences whose nearest neighbour
    among the other evaluation sentences is the same under both models. Both are 1.0 for
    the float model itself."""
    embeddings, reference = paired_outputs(model, float_model, loader)
    return {"cosine": mean_cosine(embeddings, reference),
            "retrieval_agreement": neighbour_agreement(embeddings, reference)}


def mean_cosine(embeddings: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over rows of the cosine between matching rows of two ``[N, D]`` tensors."""
    return F.cosine_similarity(embeddings.double(), reference.double(), dim=1).mean().item()


def neighbour_agreement(embeddings: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of rows whose cosine nearest neighbour (itself excluded) is the same row index
    in ``embeddings`` as in ``reference``."""
    if len(embeddings) < 2:
        raise ValueError(f"retrieval agreement needs >= 2 evaluation samples, got {len(embeddings)}")
    return (nearest_neighbours(embeddings) == nearest_neighbours(reference)).double().mean().item()


def nearest_neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    """For each row, the index of the other row with the highest cosine similarity."""
    unit = F.normalize(embeddings.double(), dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-torch.inf)
    return similarity.argmax(dim=1)
