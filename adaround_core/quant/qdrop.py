"""QDrop (Wei et al., ICLR 2022): randomly drop activation quantization while reconstructing.

During the optimisation of a unit, each element of an activation fake-quant's output is
replaced by its float input with probability ``drop_prob`` (a fresh mask every call), so
the rounding learns to work under a range of activation noise instead of one fixed
quantization of it. The masks come from a generator seeded by ``seed`` and the unit's name
alone: the same seed gives the same masks. Nothing is dropped outside reconstruction.
"""

from __future__ import annotations

import zlib

import torch

# Multiplies the seed (a prime), so that seed s of one unit and s + 1 of another rarely coincide.
_SEED_STRIDE = 1_000_003
_STREAM = "qdrop:"  # keeps the mask stream apart from the unit's sampling stream


def qdrop_generator(seed: int, unit: str, device: torch.device | str = "cpu") -> torch.Generator:
    """The random source of one unit's QDrop masks, fixed by ``seed`` and ``unit`` alone."""
    generator = torch.Generator(device=device)
    return generator.manual_seed(seed * _SEED_STRIDE + zlib.crc32((_STREAM + unit).encode()))


def drop_mask(like: torch.Tensor, drop_prob: float, generator: torch.Generator) -> torch.Tensor:
    """Boolean mask shaped like ``like``: True (keep the float value) with probability
    ``drop_prob``, element-wise."""
    draws = torch.rand(like.shape, generator=generator, device=like.device, dtype=torch.float32)
    return draws < drop_prob


def qdrop(x: torch.Tensor, quantized: torch.Tensor, drop_prob: float,
          generator: torch.Generator) -> torch.Tensor:
    """``quantized``, with each element replaced by the float ``x`` with probability
    ``drop_prob`` (gradients flow to whichever was kept)."""
    if drop_prob <= 0.0:
        return quantized
    return torch.where(drop_mask(x, drop_prob, generator), x, quantized)
