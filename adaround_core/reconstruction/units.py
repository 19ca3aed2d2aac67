"""The units of a rounding run: blocks reconstructed jointly, the other layers alone.

With ``granularity: layer`` every selected layer is its own unit. With ``granularity:
block`` the blocks (``blocks``, or those :func:`~.block_discovery.find_blocks` finds) that
hold a selected layer are units, in the order the forward pass first calls their first
layer; selected layers in no block stay units of their own. A unit is named by its module's
qualified name, which is what a cache or a resumable pipeline step would key it by.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from adaround_core.reconstruction.block_discovery import check_blocks, find_blocks
from adaround_core.reconstruction.reconstruction_config import AdaRoundConfig


@dataclass(frozen=True)
class Unit:
    """What is reconstructed at once: module ``name`` and the selected layers in it, in
    first-call order (a block also runs its excluded layers, with their weights as given)."""

    name: str
    layers: tuple[str, ...]
    is_block: bool = False


def plan_units(model: nn.Module, selected: list[str], cfg: AdaRoundConfig) -> list[Unit]:
    """The units covering the ``selected`` layers (in rounding order), for ``cfg``."""
    if cfg.granularity == "layer":
        return [Unit(name, (name,)) for name in selected]
    blocks = find_blocks(model) if cfg.blocks is None else check_blocks(model, cfg.blocks)
    units: list[Unit] = []
    emitted: set[str] = set()
    for name in selected:
        block = next((b for b in blocks if name.startswith(b + ".") or name == b), None)
        if block is None:
            units.append(Unit(name, (name,)))
        elif block not in emitted:
            emitted.add(block)
            members = tuple(n for n in selected if n.startswith(block + ".") or n == block)
            units.append(Unit(block, members, is_block=True))
    return units
